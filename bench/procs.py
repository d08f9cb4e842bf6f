"""The processes a benchmark run starts: the fake upstream, the proxy, a private Redis.

Each is a real child process on a free port, stopped (and only it) when the run ends.
Memory is read from /proc: a proxy's RSS is the sum over its worker processes (the
supervisor of ``--workers N`` only sleeps and is not counted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if callable(check) and check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f}s")
        time.sleep(0.05)


def cluster_port() -> int:
    """A free port below 55535 whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port < 55535 and port_free(port + 10000):
            return port


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
        return bool(answer.status == 200)


class Child:
    """A child process in its own process group, so that stopping it stops its workers."""

    def __init__(self, argv: list[str], log: Path | None = None) -> None:
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=out, start_new_session=True
            )
        finally:
            if not isinstance(out, int):  # the child has its own copy of the file
                out.close()
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()

    def workers(self) -> list[int]:
        """The processes that serve: the children if there are any, else this one."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        pids = [int(p) for p in children.read_text().split()] if children.exists() else []
        return pids or [self.pid]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the serving processes so far: unlike throughput, it
        hardly moves when other jobs compete for the machine."""
        return sum(_cpu_ticks(pid) for pid in self.workers()) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        return sum(_rss_kb(pid) for pid in self.workers()) / 1024


def _rss_kb(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_ticks(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    return 0


def start_upstream(port: int, chunks: int, interval_ms: float) -> Child:
    child = Child(
        [
            sys.executable,
            "-m",
            "bench.upstream",
            "--port",
            str(port),
            "--chunks",
            str(chunks),
            "--interval-ms",
            str(interval_ms),
        ]
    )
    wait_for(lambda: accepts(port), "the fake upstream")
    return child


def start_aiohttp_upstream(port: int) -> Child:
    child = Child([sys.executable, "-m", "bench.aiohttp_upstream", "--port", str(port)])
    wait_for(lambda: accepts(port), "the aiohttp fake upstream")
    return child


def start_proxy(config: Path, port: int, workers: int, log: Path) -> Child:
    child = Child(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--shutdown-timeout",
            "2",
        ],
        log=log,
    )
    wait_for(lambda: healthy(port), "the proxy")
    if workers > 1:  # every worker must be listening before the load starts
        wait_for(lambda: len(child.workers()) == workers, "the proxy's workers")
        time.sleep(1.0)
    return child


def start_bare_relay(upstream_port: int, port: int) -> Child:
    child = Child(
        [
            sys.executable,
            "-m",
            "bench.bare_relay",
            "--port",
            str(port),
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
        ]
    )
    wait_for(lambda: healthy(port), "the bare relay")
    return child


def start_redis(port: int, workdir: Path) -> Child:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        raise RuntimeError("no redis-server on PATH: apt-get install -y redis-server")
    child = Child(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ]
    )
    wait_for(lambda: accepts(port), "redis-server")
    return child


def start_redis_cluster(ports: list[int], workdir: Path) -> list[Child]:
    """A Redis Cluster of ``len(ports)`` primaries (no replicas: the bench measures the
    routing, not a failover), made with ``redis-cli --cluster create``."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if binary is None or cli is None:
        raise RuntimeError("no redis-server or redis-cli on PATH: apt-get install redis-server")
    children = []
    for port in ports:
        node = workdir / f"node-{port}"
        node.mkdir()
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf")]
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        children.append(Child([binary, *args, "--dir", str(node), *cluster]))
        wait_for(lambda port=port: accepts(port), "redis-server")
    nodes = [f"127.0.0.1:{p}" for p in ports]
    create = [cli, "--cluster", "create", *nodes, "--cluster-yes"]
    subprocess.run(create, check=True, capture_output=True, timeout=60)
    cluster_info = b"*2\r\n$7\r\nCLUSTER\r\n$4\r\nINFO\r\n"
    wait_for(
        lambda: all("cluster_state:ok" in _info(p, cluster_info) for p in ports),
        "the Redis Cluster",
    )
    return children


def redis_stats(port: int) -> dict[str, float]:
    """Redis's command counts ({command: calls}, from ``INFO commandstats``) and its CPU
    seconds (``cpu``, from ``INFO cpu``), over a raw socket (one tiny dependency less)."""
    info = _info(port)
    stats = {name: float(fields["calls"]) for name, fields in _commandstats(info).items()}
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name in ("used_cpu_sys", "used_cpu_user"):
            stats["cpu"] = stats.get("cpu", 0.0) + float(value)
    return stats


def redis_script_us(port: int) -> tuple[float, int]:
    """Redis's time running scripts by digest (µs, summed) and how many it ran."""
    fields = _commandstats(_info(port)).get("evalsha", {})
    return float(fields.get("usec", 0)), int(fields.get("calls", 0))


def _commandstats(info: str) -> dict[str, dict[str, str]]:
    """``cmdstat_NAME:calls=…,usec=…`` lines: {NAME: {field: value}}."""
    stats = {}
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(","))
            stats[name.removeprefix("cmdstat_")] = fields
    return stats


def _info(port: int, command: bytes = b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n") -> str:
    """A command whose reply is one bulk string (INFO, CLUSTER INFO), over a raw socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        size = int(data[1 : data.index(b"\r\n")])
        start = data.index(b"\r\n") + 2
        while len(data) < start + size:
            data += s.recv(65536)
    return data[start : start + size].decode()
