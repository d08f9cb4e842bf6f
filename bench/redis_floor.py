"""What any admission through Redis waits for at c=1, whatever the proxy around it: the
reference the Redis setups' added latency is read against (issue 18's target).

Measured in the bench's own run, on the same Redis, with nothing else running: a PING
round trip over a bare asyncio connection (the loopback and the two processes' wake-ups),
then the proxy's own admission (``RedisStore.admit``: the Lua script, the batching
client, the reply's parsing) one call after another, and Redis's own time per admission
script (``INFO commandstats``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from bench.procs import redis_script_us
from bench.scenario import run_async
from proxy.limits.redis_store import RedisStore
from proxy.limits.store import Check

CALLS = 10_000
# The bench team's checks (bench/scenario.py's routes.yaml): the same script work.
CHECKS = (
    Check("*", "requests_per_minute", 100_000_000),
    Check("*", "tokens_per_minute", 10_000_000_000),
    Check("*", "concurrent", 100_000),
)


@dataclass(frozen=True)
class RedisFloor:
    ping_p50_ms: float
    admit_p50_ms: float
    script_us: float  # Redis's own time per admission script


def measure_redis_floor(port: int) -> RedisFloor:
    ping = run_async(lambda: _ping_p50(port))
    before = redis_script_us(port)
    admit = run_async(lambda: _admit_p50(port))
    after = redis_script_us(port)
    script_us = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return RedisFloor(ping, admit, script_us)


async def _ping_p50(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    for _ in range(CALLS):
        start = time.perf_counter()
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        await reader.readline()
        samples.append(time.perf_counter() - start)
    writer.close()
    return _p50_ms(samples)


async def _admit_p50(port: int) -> float:
    store = RedisStore(f"redis://127.0.0.1:{port}/0", 5.0)
    checks = store.prepare("bench-floor", CHECKS)
    samples = []
    try:
        for _ in range(CALLS):
            start = time.perf_counter()
            # A lease that outlives the run: nothing settles here, only admission is timed.
            await store.admit(checks, 100, uuid.uuid4().hex, 60.0)
            samples.append(time.perf_counter() - start)
    finally:
        await store.close()
    return _p50_ms(samples)


def _p50_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1000
