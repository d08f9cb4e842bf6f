"""The measurements: the same loads against the fake upstream directly and through a proxy.

Direct figures are the baseline; everything the table calls "added" is proxied minus
direct, measured on the same machine in the same run.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from bench import instructions
from bench.nginx import start_nginx
from bench.procs import Child, free_port, redis_stats, start_bare_relay, start_proxy
from bench.streams import StreamResult, run_streams
from bench.wrk import BODY, WrkResult, run_wrk, write_script
from proxy.call.auth import key_hash

BENCH_KEY = "sk-proxy-bench-0123456789"
STREAM_EVENTS = 102  # the role chunk, the paced chunks (100), [DONE]
T = TypeVar("T")
# What serves a setup: the proxy, or one of the two references it is measured against,
# bench/bare_relay.py (the least an aiohttp relay does) and nginx (a compiled proxy).
Kind = Literal["proxy", "relay", "nginx"]


@dataclass(frozen=True)
class Durations:
    latency: float = 5.0
    throughput: float = 10.0
    warmup: float = 5.0
    streams: int = 500
    memory_requests: int = 100_000
    instructions: bool = True  # callgrind counts (about a minute per setup)


@dataclass(frozen=True)
class Setup:
    name: str
    workers: int
    redis_port: int | None = None
    kind: Kind = "proxy"
    # A Redis Cluster's other nodes (redis_port is the one routes.yaml names): the
    # Redis figures are summed over all of them.
    cluster_ports: tuple[int, ...] = ()
    # A team with limits, its calls authenticated: always with Redis; without it, the
    # limits and ledger in the process (what Redis's cost is measured against).
    limits: bool = False

    @property
    def teams(self) -> bool:
        return self.limits or self.redis_port is not None

    def redis_ports(self) -> tuple[int, ...]:
        return () if self.redis_port is None else (self.redis_port, *self.cluster_ports)


@dataclass
class RedisFigures:
    scripts_per_request_c1: float  # script calls (EVALSHA, EVAL) per call, sequential
    scripts_per_request: float  # the same at c=64, where a team's calls share scripts
    commands_per_request: float  # at c=64, the scripts' own commands included
    cpu_us: float  # Redis's CPU time per c=64 request
    admit_ms: float
    settle_ms: float


@dataclass
class Figures:
    name: str
    latency: WrkResult
    throughput: WrkResult
    streams: StreamResult
    rss_mb: dict[str, float] = field(default_factory=dict)
    memory_requests: int = 0
    cpu_us: float = float("nan")  # CPU time of the serving processes per c=64 request
    kilo_instructions: float = float("nan")  # per c=1 request, by callgrind (one process)
    redis: RedisFigures | None = None
    kind: Kind = "proxy"


def run_async(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(work())
    return uvloop.run(work())


def measure_direct(port: int, tmp: Path, d: Durations) -> Figures:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    script = write_script(tmp, None)
    return Figures(
        name="direct",
        latency=run_wrk(url, script, 1, d.latency),
        throughput=run_wrk(url, script, 64, d.throughput),
        streams=run_async(lambda: run_streams(port, d.streams, STREAM_EVENTS)),
    )


def routes_yaml(upstream_port: int, redis_port: int | None, limits: bool = False) -> str:
    lines = [
        "server: {max_body_bytes: 1MiB, reload_interval: 60s}",
        "providers:",
        f"  bench: {{base_url: 'http://127.0.0.1:{upstream_port}/v1'}}",
        "models:",
        "  bench-model: {targets: [{provider: bench, model: bench-model}]}",
    ]
    if redis_port is not None:
        lines.append(f"redis: {{url: 'redis://127.0.0.1:{redis_port}/0'}}")
    if redis_port is not None or limits:
        lines += [
            "teams:",
            "  bench:",
            f"    keys: ['{key_hash(BENCH_KEY)}']",
            "    limits: {requests_per_minute: 100000000, tokens_per_minute: 10000000000,",
            "             concurrent: 100000}",
        ]
    return "\n".join(lines) + "\n"


def _start(setup: Setup, upstream_port: int, tmp: Path) -> tuple[Child, int, Path]:
    """What serves a setup, in front of the upstream on a port: the process, the port
    it serves and the proxy's routes.yaml (written for every kind, read by the proxy)."""
    name = f"{setup.workers}-{setup.redis_port or 0}-{len(setup.cluster_ports)}-{setup.teams}"
    config = tmp / f"routes-{name}.yaml"
    config.write_text(routes_yaml(upstream_port, setup.redis_port, setup.limits))
    port = free_port()
    if setup.kind == "relay":
        return start_bare_relay(upstream_port, port), port, config
    if setup.kind == "nginx":
        return start_nginx(upstream_port, port, tmp), port, config
    return start_proxy(config, port, setup.workers, tmp / "proxy.log"), port, config


def measure_proxy(setup: Setup, upstream_port: int, tmp: Path, d: Durations) -> Figures:
    proxy, port, config = _start(setup, upstream_port, tmp)
    try:
        figures = _measure(setup, proxy, port, tmp, d)
    finally:
        proxy.stop()
    counted = setup.workers == 1 and setup.kind != "nginx"  # one process, Python
    if counted and d.instructions and instructions.have_valgrind():
        figures.kilo_instructions = _instructions(setup, upstream_port, config, tmp)
    return figures


@dataclass(frozen=True)
class Calibrated:
    """c=64 throughput in front of bench/aiohttp_upstream.py: direct, then per setup."""

    direct: WrkResult
    proxied: tuple[tuple[str, WrkResult], ...]
    relay: str | None  # the name of the bare relay's setup, if it ran
    nginx: str | None = None  # and nginx's

    def share(self, name: str, of: str = "direct") -> float:
        """A setup's throughput as a percentage of direct's, or of another setup's."""
        results = dict(self.proxied)
        base = self.direct if of == "direct" else results[of]
        return 100 * results[name].rps / base.rps


def measure_calibrated(
    setups: list[Setup], upstream_port: int, tmp: Path, d: Durations
) -> Calibrated:
    url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    script = write_script(tmp, None)
    run_wrk(url, script, 64, d.warmup / 2)
    direct = run_wrk(url, script, 64, d.throughput)
    proxied = []
    for setup in setups:
        proxy, port, _ = _start(setup, upstream_port, tmp)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            script = write_script(tmp, BENCH_KEY if setup.teams else None)
            run_wrk(url, script, 64, d.warmup / 2)
            proxied.append((setup.name, run_wrk(url, script, 64, d.throughput)))
        finally:
            proxy.stop()
    names = {setup.kind: setup.name for setup in setups}
    return Calibrated(direct, tuple(proxied), names.get("relay"), names.get("nginx"))


def _instructions(setup: Setup, upstream_port: int, config: Path, tmp: Path) -> float:
    """The same calls, counted by callgrind (one process: workers and supervisor would
    each need their own count)."""

    def argv(port: int) -> list[str]:
        if setup.kind == "relay":
            return [
                sys.executable,
                "-m",
                "bench.bare_relay",
                "--port",
                str(port),
                "--upstream",
                f"http://127.0.0.1:{upstream_port}",
            ]
        return [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--shutdown-timeout",
            "1",
        ]

    headers = {"Content-Type": "application/json"}
    if setup.teams:
        headers["Authorization"] = f"Bearer {BENCH_KEY}"
    return instructions.per_request(argv, BODY.encode(), headers, tmp)


def _measure(setup: Setup, proxy: Child, port: int, tmp: Path, d: Durations) -> Figures:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    key = BENCH_KEY if setup.teams else None
    script = write_script(tmp, key)
    rss = {"idle": proxy.rss_mb()}
    run_wrk(url, script, 64, d.warmup)
    rss["warm"] = proxy.rss_mb()
    sequential = _redis_state(setup.redis_ports(), port)
    latency = run_wrk(url, script, 1, d.latency)
    before = _redis_state(setup.redis_ports(), port)
    cpu = proxy.cpu_seconds()
    throughput = run_wrk(
        url, script, 64, d.throughput, during=lambda: rss.update(load=proxy.rss_mb())
    )
    cpu = proxy.cpu_seconds() - cpu
    after = _redis_state(setup.redis_ports(), port)
    done = latency.requests + throughput.requests
    while done < d.memory_requests:
        more = (d.memory_requests - done) / max(throughput.rps, 100.0) * 1.1 + 1
        done += run_wrk(url, script, 64, min(more, 60.0)).requests
    rss["after"] = proxy.rss_mb()
    streams = run_async(lambda: run_streams(port, d.streams, STREAM_EVENTS, key))
    if streams.complete < streams.streams:
        _say_why(setup.name, streams, tmp / "proxy.log" if setup.kind == "proxy" else None)
    figures = Figures(
        setup.name,
        latency,
        throughput,
        streams,
        rss,
        done,
        cpu_us=cpu / max(throughput.requests, 1) * 1e6,
        kind=setup.kind,
    )
    if setup.redis_port:
        figures.redis = _redis_figures((sequential, before), (before, after), port)
    return figures


def _say_why(name: str, streams: StreamResult, log: Path | None) -> None:
    """An incomplete stream is a finding, not noise: show what the proxy logged."""
    print(f"[bench] {name}: {streams.streams - streams.complete} stream(s) incomplete")
    for short in streams.short[:3]:
        print(f"[bench]   {short}")
    if log is not None and log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if " WARNING " in line or " ERROR " in line or "stream_error" in line:
                print(f"[bench]   {line[:400]}")


State = dict[str, float]


def _redis_state(redis_ports: tuple[int, ...], port: int) -> State:
    """Redis's command counts and CPU (summed over a Cluster's nodes), and the proxy's
    own count of calls, once every call in flight has settled: calls wrk cut off at its
    end are admitted and settled too."""
    if not redis_ports:
        return {}
    time.sleep(0.5)
    state: State = {}
    for redis_port in redis_ports:
        for name, value in redis_stats(redis_port).items():
            state[name] = state.get(name, 0.0) + value
    state["proxied calls"] = sum(float(v) for v in _REQUESTS.findall(_scrape(port)))
    return state


_REQUESTS = re.compile(r"^llm_proxy_requests_total\{[^}]*\} (\S+)$", re.MULTILINE)


def _redis_figures(
    sequential: tuple[State, State], loaded: tuple[State, State], port: int
) -> RedisFigures:
    def per_request(states: tuple[State, State], *names: str) -> float:
        before, after = states
        calls = after["proxied calls"] - before["proxied calls"]
        return sum(after.get(n, 0) - before.get(n, 0) for n in names) / max(calls, 1)

    commands = [n for n in loaded[1] if n not in ("info", "proxied calls", "cpu")]
    metrics = _scrape(port)
    return RedisFigures(
        scripts_per_request_c1=per_request(sequential, "evalsha", "eval"),
        scripts_per_request=per_request(loaded, "evalsha", "eval"),
        commands_per_request=per_request(loaded, *commands),
        cpu_us=per_request(loaded, "cpu") * 1e6,
        admit_ms=_mean_ms(metrics, "admit"),
        settle_ms=_mean_ms(metrics, "settle"),
    )


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text: str = answer.read().decode()
        return text


def _mean_ms(metrics: str, operation: str) -> float:
    """Mean Redis round trip of one operation, as the proxy itself timed it."""

    def value(suffix: str) -> float:
        pattern = rf'^llm_proxy_redis_latency_seconds_{suffix}\{{operation="{operation}"\}} (\S+)$'
        found = re.search(pattern, metrics, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    count = value("count")
    return value("sum") / count * 1000 if count else float("nan")
