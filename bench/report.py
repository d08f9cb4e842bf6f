"""The table: what the proxy adds, per setup, with the machine it was measured on."""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

from bench.nginx import have_nginx
from bench.scenario import Calibrated, Figures

Cell = Callable[[Figures, Figures], str]


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _redis(get: Callable[[Figures], float], digits: int = 2) -> Cell:
    return lambda f, d: _f(get(f), digits) if f.redis is not None else "-"


def _rss(key: str) -> Cell:
    return lambda f, d: _f(f.rss_mb[key], 1) if f.rss_mb else "-"


def _growth(f: Figures, d: Figures) -> str:
    return _f(f.rss_mb["after"] - f.rss_mb["warm"], 1) if f.rss_mb else "-"


def _pair(get: Callable[[Figures], tuple[float, float]], added: bool = False) -> Cell:
    """Two figures (p50 / p99) of a setup, or what it adds to the direct ones."""

    def cell(f: Figures, d: Figures) -> str:
        (a, b), (da, db) = get(f), get(d)
        return f"{_f(a - da)} / {_f(b - db)}" if added else f"{_f(a)} / {_f(b)}"

    return cell


def _ttfb(f: Figures) -> tuple[float, float]:
    return f.streams.ttfb_p50_ms, f.streams.ttfb_p99_ms


def _gap(f: Figures) -> tuple[float, float]:
    return f.streams.gap_p50_ms, f.streams.gap_p99_ms


def _steady(f: Figures) -> tuple[float, float]:
    return f.streams.steady_gap_p50_ms, f.streams.steady_gap_p99_ms


def _kilo(f: Figures, d: Figures) -> str:
    return "-" if math.isnan(f.kilo_instructions) else f"{f.kilo_instructions:,.0f}"


def _ratio(f: Figures, d: Figures) -> str:
    return _f(100 * f.throughput.rps / d.throughput.rps, 1)


# (row label, value for a proxied setup given the direct figures)
ROWS: list[tuple[str, Cell]] = [
    ("c=1 latency p50, ms", lambda f, d: _f(f.latency.p50_ms, 3)),
    ("c=1 latency p99, ms", lambda f, d: _f(f.latency.p99_ms, 3)),
    ("**added** latency p50, ms", lambda f, d: _f(f.latency.p50_ms - d.latency.p50_ms, 3)),
    ("**added** latency p99, ms", lambda f, d: _f(f.latency.p99_ms - d.latency.p99_ms, 3)),
    ("c=64 throughput, req/s", lambda f, d: f"{f.throughput.rps:,.0f}"),
    ("**c=64 throughput, % of direct**", _ratio),
    ("c=64 latency p99, ms", lambda f, d: _f(f.throughput.p99_ms, 2)),
    ("CPU per request at c=64, µs", lambda f, d: _f(f.cpu_us, 0)),
    ("**instructions per request** at c=1 (callgrind), thousands", _kilo),
    ("c=64 errors / non-2xx", lambda f, d: f"{f.throughput.errors} / {f.throughput.non2xx}"),
    ("streams complete", lambda f, d: f"{f.streams.complete}/{f.streams.streams}"),
    ("stream TTFB p50 / p99, ms", _pair(_ttfb)),
    ("**added** TTFB p50 / p99, ms", _pair(_ttfb, added=True)),
    ("chunk gap p50 / p99, ms", _pair(_gap)),
    ("**added** chunk gap p50 / p99, ms", _pair(_gap, added=True)),
    ("chunk gap once all streams run, p50 / p99, ms", _pair(_steady)),
    ("**added** chunk gap once all streams run, p50 / p99, ms", _pair(_steady, added=True)),
    ("RSS idle, MB", _rss("idle")),
    ("RSS after warm-up, MB", _rss("warm")),
    ("RSS under c=64 load, MB", _rss("load")),
    ("RSS after the requests below, MB", _rss("after")),
    ("requests since warm-up", lambda f, d: f"{f.memory_requests:,}" if f.rss_mb else "-"),
    ("**RSS growth after warm-up, MB**", _growth),
    ("**Redis script calls per request** at c=1 (EVALSHA)",
     _redis(lambda f: f.redis.scripts_per_request_c1 if f.redis else 0)),
    ("Redis script calls per request at c=64 (a team's calls of one loop turn share one)",
     _redis(lambda f: f.redis.scripts_per_request if f.redis else 0)),
    ("Redis commands run per request at c=64 (incl. inside scripts)",
     _redis(lambda f: f.redis.commands_per_request if f.redis else 0, 1)),
    ("Redis CPU per request at c=64, µs", _redis(lambda f: f.redis.cpu_us if f.redis else 0, 0)),
    ("admission round trip (mean), ms", _redis(lambda f: f.redis.admit_ms if f.redis else 0, 3)),
    ("settlement round trip (mean), ms", _redis(lambda f: f.redis.settle_ms if f.redis else 0, 3)),
]  # fmt: skip


def table(direct: Figures, proxied: list[Figures]) -> str:
    head = "| | direct | " + " | ".join(f.name for f in proxied) + " |"
    lines = [head, "|---" * (len(proxied) + 2) + "|"]
    for label, cell in ROWS:
        direct_value = _direct_cell(label, direct)
        values = " | ".join(cell(f, direct) for f in proxied)
        lines.append(f"| {label} | {direct_value} | {values} |")
        if label.startswith("**c=64 throughput") and (bare := _bare(proxied)) is not None:
            # The other yardstick: with every feature on, beat the bare relay.
            values = " | ".join(_ratio(f, bare) for f in proxied)
            lines.append(f"| c=64 throughput, % of the bare relay | - | {values} |")
    return "\n".join(lines)


def calibrated_table(c: Calibrated) -> str:
    """The c=64 pass in front of the aiohttp upstream: req/s, % of direct, % of the relay."""
    names = [name for name, _ in c.proxied]
    rows = [
        (
            "c=64 throughput, req/s",
            f"{c.direct.rps:,.0f}",
            [f"{result.rps:,.0f}" for _, result in c.proxied],
        ),
        ("**c=64 throughput, % of direct**", "-", [_f(c.share(n), 1) for n in names]),
        (
            "c=64 errors / non-2xx",
            f"{c.direct.errors} / {c.direct.non2xx}",
            [f"{r.errors} / {r.non2xx}" for _, r in c.proxied],
        ),
    ]
    if c.relay is not None:
        rows.insert(
            2,
            (
                "c=64 throughput, % of the bare relay",
                "-",
                [_f(c.share(n, c.relay), 1) for n in names],
            ),
        )
    lines = ["| | direct | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    lines += [f"| {label} | {direct} | {' | '.join(cells)} |" for label, direct, cells in rows]
    return "\n".join(lines)


def _bare(proxied: list[Figures]) -> Figures | None:
    return next((f for f in proxied if f.kind == "relay"), None)


def _both(pair: tuple[float, float]) -> str:
    return f"{_f(pair[0])} / {_f(pair[1])}"


def _direct_cell(label: str, d: Figures) -> str:
    plain = {
        "c=1 latency p50, ms": _f(d.latency.p50_ms, 3),
        "c=1 latency p99, ms": _f(d.latency.p99_ms, 3),
        "c=64 throughput, req/s": f"{d.throughput.rps:,.0f}",
        "c=64 latency p99, ms": _f(d.throughput.p99_ms, 2),
        "c=64 errors / non-2xx": f"{d.throughput.errors} / {d.throughput.non2xx}",
        "streams complete": f"{d.streams.complete}/{d.streams.streams}",
        "stream TTFB p50 / p99, ms": _both(_ttfb(d)),
        "chunk gap p50 / p99, ms": _both(_gap(d)),
        "chunk gap once all streams run, p50 / p99, ms": _both(_steady(d)),
    }
    return plain.get(label, "-")


@dataclass(frozen=True)
class Machine:
    date: str
    cores: int
    cpu: str
    kernel: str
    versions: str
    load_before: str
    load_after: str = ""


def machine(load_before: str) -> Machine:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = ", ".join(
        [
            f"Python {platform.python_version()}",
            *(f"{name} {version(name)}" for name in ("aiohttp", "uvloop", "redis")),
            _first_line(["wrk", "-v"], 2),
            _first_line(["redis-server", "--version"], 3),
            *([_first_line(["nginx", "-v"], 3).split()[-1]] if have_nginx() else []),
        ]
    )
    return Machine(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cores=os.cpu_count() or 0,
        cpu=cpu,
        kernel=platform.release(),
        versions=versions,
        load_before=load_before,
    )


def load_average() -> str:
    return " ".join(_read("/proc/loadavg").split()[:3])


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _first_line(command: list[str], words: int) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return f"{command[0]} missing"
    text = (done.stdout or done.stderr).strip()
    return " ".join(text.splitlines()[0].split()[:words]) if text else command[0]
