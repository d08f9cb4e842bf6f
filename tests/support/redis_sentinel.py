"""A private Sentinel deployment for the tests: a primary, a replica and three sentinels
(redis-server in sentinel mode: no other binary), on free ports, with a short
down-after so that a killed primary is replaced within a test's patience."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support import free_port
from tests.support.redis_server import RedisServer, Tls

SERVICE = "proxy-primary"
DOWN_AFTER_MS = 1000
# Redis's defaults wait 60 s before a replica retries a sync handshake that stalled
# (repl-timeout) and 5 s before a full sync starts (repl-diskless-sync-delay): a stall
# right after a failover then used up the whole patience of the failover test (CI,
# stop 29). A replica that notices in 5 s and syncs at once keeps such a test in
# seconds; the master pings every second so that an idle link never looks dead.
_REPLICATION = (
    *("--repl-timeout", "5", "--repl-ping-replica-period", "1"),
    *("--repl-diskless-sync-delay", "0"),
)


class RedisSentinels:
    """``password``: the data nodes require it (the sentinels do not, as Debian ships
    them); ``tls``: everything speaks TLS only, sentinels included."""

    def __init__(self, workdir: Path, password: str = "", tls: Tls | None = None) -> None:
        (workdir / "primary").mkdir()
        (workdir / "replica").mkdir()
        self.tls = tls
        self._auth = ("--masterauth", password) if password else ()
        self.primary = RedisServer(
            workdir / "primary", password=password, args=self._node_args(), tls=tls
        )
        follow = self._node_args(self.primary)
        self.replica = RedisServer(workdir / "replica", password=password, args=follow, tls=tls)
        self.ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            conf = workdir / f"sentinel-{port}.conf"  # sentinel rewrites it: its own file
            conf.write_text(
                f"bind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
                + _listen(port, tls)
                + f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
                + (f"sentinel auth-pass {SERVICE} {password}\n" if password else "")
            )
            self.sentinels.append(
                subprocess.Popen(
                    [self.primary.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.wait_for(self._ready)

    def _ready(self) -> bool:
        return self._replica_seen() and self._in_sync(self.replica) and self._acked(self.primary)

    def _node_args(self, primary: RedisServer | None = None) -> tuple[str, ...]:
        follow = () if primary is None else ("--replicaof", "127.0.0.1", str(primary.port))
        return (*follow, *self._auth, *_REPLICATION)

    async def rejoin(self, node: RedisServer, primary: RedisServer) -> None:
        """Restart a killed ``node`` as ``primary``'s replica and wait until it is in
        sync (sentinel would convert it too, but only on its next look at the node,
        seen to take 10 s and more under load)."""
        node.args = self._node_args(primary)
        await node.restart()
        await asyncio.to_thread(
            self.wait_for,
            lambda: self._in_sync(node) and self._acked(primary),
            60,
            lambda: _state(node, primary),
        )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        password = self.primary.password
        return f"{scheme}://{f':{password}@' if password else ''}{hosts}/{SERVICE}"

    def _sentinel(self) -> redis.Redis:
        tls = {} if self.tls is None else {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        return redis.Redis(port=self.ports[0], socket_timeout=2, **tls)  # type: ignore[arg-type]

    def primary_port(self) -> int | None:
        """The primary the sentinels name now."""
        client = self._sentinel()
        try:
            host_port = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
            )
        except redis.RedisError:
            return None
        finally:
            client.close()
        return int(host_port[1]) if host_port else None

    def _replica_seen(self) -> bool:
        client = self._sentinel()
        try:
            replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return False
        finally:
            client.close()
        return bool(replicas)

    @staticmethod
    def _in_sync(node: RedisServer) -> bool:
        client = node.client()
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    @staticmethod
    def _acked(primary: RedisServer) -> bool:
        """A write on ``primary`` that a replica acknowledged (WAIT): replication
        streams, as the ledger's settlements need with ``ledger_replicas: 1``."""
        client = primary.client()
        try:
            client.set("tests:replicated", "1")
            return int(client.execute_command("WAIT", 1, 200)) >= 1  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return False
        finally:
            client.close()

    @staticmethod
    def wait_for(
        condition: Callable[[], bool],
        timeout: float = 30.0,
        state: Callable[[], str] = lambda: "",
    ) -> None:
        """``state``: what the failure message shows of the nodes, to tell why."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Sentinel deployment did not get there\n{state()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.kill()
            sentinel.wait()
        self.primary.kill()
        self.replica.kill()


def _state(*nodes: RedisServer) -> str:
    """Each node's replication section and the end of its log."""
    parts = []
    for node in nodes:
        client = node.client()
        try:
            info = str(client.info("replication"))
        except redis.RedisError as error:
            info = repr(error)
        finally:
            client.close()
        parts.append(f"--- node {node.port}: {info}\n{node.log()[-1500:]}")
    return "\n".join(parts)


def _listen(port: int, tls: Tls | None) -> str:
    """A sentinel's port lines: plain, or TLS only (to clients and to the nodes)."""
    if tls is None:
        return f"port {port}\n"
    return (
        f"port 0\ntls-port {port}\ntls-cert-file {tls.cert}\ntls-key-file {tls.key}\n"
        f"tls-ca-cert-file {tls.ca}\ntls-auth-clients no\ntls-replication yes\n"
    )
