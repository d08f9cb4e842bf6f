"""What budgets add to an admission and its settlement: the bench team's limits
(bench/redis_floor.py's checks) alone, and with a daily and a monthly budget beside
them. In memory, per admit + settle, with a month of ledger rows (30 days x 10 models x
3 keys) for the budgets to read; in Redis, Redis's own time per admission and per
settlement script (``INFO commandstats``), and the proxy's p50 of an admission.

    python3 -m bench.budget_cost
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.procs import free_port, redis_script_us, start_redis
from bench.redis_floor import CHECKS
from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.store import DAY, Check, Settlement

BUDGETS = (Check("*", "daily_usd", 10**15), Check("*", "monthly_usd", 10**15))
CALLS = 5_000


def _settlement(store: MemoryStore | RedisStore, checks: tuple[Check, ...], rid: str,
                day: int, model: str = "m", key: str = "k",
                team: str = "bench") -> Settlement:  # fmt: skip
    prepared = store.prepare(team, checks)
    return Settlement(rid, prepared, model, day, 100, 40, 50, False, 900, key, reserved_cost=1000)


async def _memory_us(checks: tuple[Check, ...]) -> float:
    store = MemoryStore()
    today = int(time.time() // DAY)
    for day in range(today - 30, today):  # a month of rows, booked ledger-only
        for model in range(10):
            for key in range(3):
                rid = f"old-{day}-{model}-{key}"
                store.settle_now(_settlement(store, (), rid, day, f"m{model}", f"k{key}"))
    prepared = store.prepare("bench", checks)
    start = time.perf_counter()
    for i in range(CALLS):
        await store.admit(prepared, 100, f"r{i}", 60.0, 1000)
        store.settle_now(_settlement(store, checks, f"r{i}", today))
    return (time.perf_counter() - start) / CALLS * 1e6


async def _redis(port: int, checks: tuple[Check, ...]) -> tuple[float, float, float]:
    """The proxy's admission p50 (ms), and Redis's µs per admission and settlement
    script: CALLS admissions one after another, then their settlements."""
    store = RedisStore(f"redis://127.0.0.1:{port}", timeout=5.0)
    team = f"bench-{len(checks)}"  # each run its own keys
    prepared = store.prepare(team, checks)
    samples = []
    try:
        await store.admit(prepared, 100, "warm", 60.0, 1000)  # the connection, the script
        before = redis_script_us(port)
        for i in range(CALLS):
            start = time.perf_counter()
            admission = await store.admit(prepared, 100, f"r{i}", 60.0, 1000)
            samples.append(time.perf_counter() - start)
        middle = redis_script_us(port)
        for i in range(CALLS):
            await store.settle(_settlement(store, checks, f"r{i}", admission.day, team=team))
        after = redis_script_us(port)
    finally:
        await store.close()
    admit_us = (middle[0] - before[0]) / (middle[1] - before[1])
    settle_us = (after[0] - middle[0]) / (after[1] - middle[1])
    return statistics.median(samples) * 1e3, admit_us, settle_us


def main() -> None:
    with_budgets = CHECKS + BUDGETS
    memory = [asyncio.run(_memory_us(c)) for c in (CHECKS, with_budgets)]
    print(f"memory, admit + settle: {memory[0]:.1f} µs, with budgets {memory[1]:.1f} µs")
    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        redis = start_redis(port, Path(directory))
        try:
            for name, checks in (("limits", CHECKS), ("limits and budgets", with_budgets)):
                p50, admit_us, settle_us = asyncio.run(_redis(port, checks))
                print(
                    f"redis, {name}: admission p50 {p50:.3f} ms; Redis's own time per "
                    f"admission {admit_us:.1f} µs, per settlement {settle_us:.1f} µs"
                )
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
