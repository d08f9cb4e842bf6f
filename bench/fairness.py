"""``python3 -m bench fairness``: does one team's flood starve another on a busy engine?

The proxy (one worker, a real process) runs the fake engine (tests/support/fake_engine.py,
a real process: every call holds a slot for ``SERVICE`` seconds, so the engine's
capacity is known exactly and no CPU contention blurs it) with ``SLOTS`` slots. Team y
sends ``Y_RATE`` calls a second; team x sends ten times that, more than the engine
serves, so its queue fills and stays full. Three runs of ``SECONDS`` each:

- y alone;
- x and y together, as two teams: the fair queue should keep y's calls near their
  time alone;
- x and y together under one team's key (so one queue order, first come first
  served): what y would get without fairness, for comparison.

The issue's target: y's p90 stays within 2x of its p90 alone. It is judged on the
time a call takes (its wait in the queue plus its service), since y's wait alone is
about 0 and a ratio of waits would divide by nearly nothing; the wait column is the
time minus the engine's fixed service time. Written to docs/BENCHMARKS.md as its own
section (bench/sections.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.procs import ROOT, Child, free_port, start_proxy
from bench.report import load_average, machine
from bench.sections import write_section
from bench.stats import percentile
from proxy.call.auth import key_hash

SERVICE, SLOTS = 0.2, 2  # the engine serves SLOTS / SERVICE = 10 calls a second
Y_RATE, X_FACTOR, SECONDS = 1.5, 10, 20.0
KEYS = {"x": "sk-bench-team-x-000000", "y": "sk-bench-team-y-000000"}
FAKE_ENGINE = ROOT / "tests" / "support" / "fake_engine.py"


@dataclass(frozen=True)
class Calls:
    """One sender's calls in one run: seconds each took, and the statuses."""

    seconds: tuple[float, ...]
    statuses: tuple[int, ...]

    def ok(self) -> list[float]:
        return [s for s, status in zip(self.seconds, self.statuses, strict=True) if status == 200]

    def p(self, q: float) -> float:
        return percentile(self.ok(), q)

    def refused(self) -> int:
        return sum(status == 429 for status in self.statuses)


@dataclass(frozen=True)
class Run:
    name: str
    x: Calls | None
    y: Calls


def routes_yaml(log: Path) -> str:
    return f"""
teams:
  x: {{keys: ["{key_hash(KEYS["x"])}"]}}
  y: {{keys: ["{key_hash(KEYS["y"])}"]}}
providers:
  local:
    engine:
      command: ["{{python}}", "{FAKE_ENGINE}", "--port", "{{port}}", "--delay", "{SERVICE}",
                "--log", "{log}"]
      slots: {SLOTS}
      queue: {{max: 64, wait: 30s}}
models:
  m: {{targets: [{{provider: local, model: m}}]}}
"""


async def _call(http: aiohttp.ClientSession, url: str, key: str) -> tuple[float, int]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    began = time.monotonic()
    async with http.post(
        url, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:  # fmt: skip
        await resp.read()
        return time.monotonic() - began, resp.status


async def _send(http: aiohttp.ClientSession, url: str, key: str, rate: float) -> Calls:
    """Open loop: call i leaves at i / rate seconds, whatever the earlier ones do."""
    start = time.monotonic()
    tasks = []
    for i in range(int(SECONDS * rate)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(_call(http, url, key)))
    done = await asyncio.gather(*tasks)
    return Calls(tuple(s for s, _ in done), tuple(status for _, status in done))


async def _runs(url: str) -> list[Run]:
    x_rate = Y_RATE * X_FACTOR
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(3):  # the engine is up and a hold time is measured
            await _call(http, url, KEYS["y"])
        alone = await _send(http, url, KEYS["y"], Y_RATE)
        runs = [Run("y alone", None, alone)]
        for name, y_key in (("x floods, two teams (fair)", "y"), ("x floods, one team", "x")):
            x, y = await asyncio.gather(
                _send(http, url, KEYS["x"], x_rate), _send(http, url, KEYS[y_key], Y_RATE)
            )
            runs.append(Run(name, x, y))
    return runs


def _row(run: Run, alone: float) -> str:
    y, x = run.y, run.x
    ratio = y.p(90) / alone
    cells = [
        run.name,
        f"{len(y.ok())}/{len(y.statuses)}",
        f"{y.p(50):.3f} / {y.p(90):.3f} / {y.p(99):.3f}",
        f"{max(0.0, y.p(90) - SERVICE):.3f}",
        f"{ratio:.2f}",
        f"{len(x.ok())}/{len(x.statuses)} ({x.refused()} refused)" if x else "-",
        f"{x.p(90):.2f}" if x and x.ok() else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def document(runs: list[Run], seconds: float) -> str:
    about = machine(load_average())
    alone = runs[0].y.p(90)
    fair = runs[1].y.p(90) / alone
    lines = [
        "## Fairness on a saturated engine (issue 23)",
        "",
        f"Measured by `python3 -m bench fairness` on the fake engine (a real process that "
        f"holds each call {SERVICE:g} s; {SLOTS} slots, so it serves "
        f"{SLOTS / SERVICE:g} calls/s; queue max 64, wait 30 s). Team y sends "
        f"{Y_RATE:g} calls/s, team x {X_FACTOR}x that ({Y_RATE * X_FACTOR:g}/s), for "
        f"{SECONDS:g} s per run, open loop. One proxy worker.",
        "",
        f"- date: {about.date}; run took {seconds:.0f} s; {about.cores} cores, {about.cpu}",
        f"- target: y's p90 with x flooding within 2x of y's p90 alone: "
        f"{fair:.2f}x, {'met' if fair <= 2 else 'NOT met'}",
        "",
        "| run | y answered | y time p50 / p90 / p99, s | y wait p90, s | y p90 / alone "
        "| x answered | x time p90, s |",
        "|---|---|---|---|---|---|---|",
        *(_row(run, alone) for run in runs),
        "",
        "A call's time is from sending to the whole answer; its wait is that time minus "
        f"the engine's {SERVICE:g} s. In the one-team run y's calls queue behind x's "
        "in arrival order (the queue is fair between teams, not within one): that is "
        "what y would see without fairness. x's refusals are 429s from its full queue. "
        "With x's calls always waiting, a y call waits for the next slot to come free "
        "and no longer: up to one service time, since the slots, started together, "
        "finish together; no queue that lets calls run to their end can do better.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench fairness", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-fairness-") as tmp:
        config, port = Path(tmp) / "routes.yaml", free_port()
        config.write_text(routes_yaml(Path(tmp) / "engine.log"))
        proxy: Child = start_proxy(config, port, 1, Path(tmp) / "proxy.log")
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            runs = asyncio.run(_runs(url))
        finally:
            proxy.stop()
    text = document(runs, time.monotonic() - started)
    print(text)
    if not args.no_write:
        write_section(args.out, "fairness", text)
        print(f"written to {args.out}", file=sys.stderr)
