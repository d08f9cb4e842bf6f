"""A private redis-server for the tests, on a free port, that they may kill and restart.
Never the shared one on 6379."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import trustme

from tests.support import eventually, free_port


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


@dataclass(frozen=True)
class Tls:
    """A throwaway CA and a certificate for 127.0.0.1 that it signed, as files: what a
    TLS-only redis-server serves, and what a client (the proxy: SSL_CERT_FILE) trusts."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path) -> Tls:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        tls = cls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        ca.cert_pem.write_to_path(str(tls.ca))
        issued.cert_chain_pems[0].write_to_path(str(tls.cert))
        issued.private_key_pem.write_to_path(str(tls.key))
        return tls

    def server_args(self, port: int) -> tuple[str, ...]:
        """TLS only (no plain port), for clients, replication and a Cluster's bus."""
        files = ("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key))
        return (
            *("--port", "0", "--tls-port", str(port), *files),
            *("--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"),
            *("--tls-replication", "yes", "--tls-cluster", "yes"),
        )


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        persistent: bool = False,
        password: str = "",
        args: tuple[str, ...] = (),
        port: int | None = None,
        tls: Tls | None = None,
    ):
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no redis-server on PATH (.ci/run installs Debian's redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = workdir
        self.persistent = persistent
        self.password = password
        self.tls = tls
        self.args = ("--requirepass", password, *args) if password else args
        if tls is not None:
            self.args = (*self.args, *tls.server_args(self.port))
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"redis-{self.port}.log"
        credentials = f":{password}@" if password else ""
        scheme = "rediss" if tls else "redis"
        self.url = f"{scheme}://{credentials}127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        # appendfsync always: every acknowledged write survives a kill -9, as the
        # ledger's exactly-once guarantee needs from a production Redis too.
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        with open(self.log_path, "ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--dir",
                    str(self.dir),
                    "--protected-mode",
                    "no",
                    *persistence,
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None:  # e.g. its port was taken meanwhile
                    tail = self.log()[-2000:]
                    raise RuntimeError(f"redis-server on {self.port} exited:\n{tail}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            finally:
                client.close()

    async def restart(self) -> None:
        """``start`` for async tests: off the event loop, which its blocking pings would stall."""
        await asyncio.to_thread(self.start)

    def log(self) -> str:
        """What the server wrote, over all its starts (as ProxyProcess.log)."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, **self.client_options()
        )

    def client_options(self) -> dict[str, Any]:
        """redis-py's options for this server's password and TLS."""
        options: dict[str, Any] = {"password": self.password or None}
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return options

    def command_calls(self) -> dict[str, int]:
        client = self.client()
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


class Monitor:
    """Redis's MONITOR feed, split into what clients sent and what scripts ran inside.

    A script's own commands appear as ``[0 lua]``; everything else is a round trip some
    client made."""

    def __init__(self, port: int):
        self.port = port
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.sendall(b"MONITOR\r\n")
        self._file = self._sock.makefile("rb")
        assert self._file.readline().startswith(b"+OK")
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._file:
                self.lines.append(line.decode(errors="replace"))
        except (OSError, ValueError):
            return

    async def stop(self) -> list[str]:
        """The commands clients sent (script internals left out), once the feed has shown
        a marker sent after them."""
        marker = f"monitor-end-{secrets.token_hex(8)}"
        await asyncio.to_thread(self._send_marker, marker)
        await eventually(lambda: any(marker in line for line in self.lines), timeout=5)
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        await asyncio.to_thread(self._thread.join, 5)
        sent = [
            line
            for line in self.lines
            if " lua]" not in line.split('"', 1)[0] and marker not in line
        ]
        return [line.split('"')[1].lower() for line in sent if '"' in line]

    def _send_marker(self, marker: str) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"*2\r\n$4\r\nECHO\r\n$%d\r\n%b\r\n" % (len(marker), marker.encode()))
            sock.recv(1024)
