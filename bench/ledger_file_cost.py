"""What the embedded ledger's file costs: a settlement's extra work on the loop (the
additions counted for the next write, limits/memory.py) against the memory store
without a file, and a write of the file (limits/ledger_file.py, in its own thread) by
the number of rows changed since the last one.

    python3 -m bench.ledger_file_cost
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from proxy.limits.ledger_file import LedgerFile
from proxy.limits.memory import MemoryStore
from proxy.limits.store import DAY, Settlement, TeamChecks

TEAMS, MODELS, KEYS = 20, 5, 3  # the rows one day of calls touches: 300


def _settlements(n: int) -> list[Settlement]:
    day = int(time.time() // DAY)
    return [
        Settlement(
            request_id=f"r{i}",
            team_checks=TeamChecks(f"team{i % TEAMS}", ()),
            model=f"model{i % MODELS}",
            day=day,
            reserved=60,
            prompt_tokens=40,
            completion_tokens=20,
            estimated=False,
            cost=123,
            key=f"key{i % KEYS}",
        )
        for i in range(n)
    ]


def settle_cost(n: int, with_file: bool) -> float:
    """µs a settlement, the file's counting on or off."""
    store, settlements = MemoryStore(), _settlements(n)
    if with_file:
        store.take_unwritten()  # what LedgerKeeper.open does
    start = time.perf_counter()
    for settlement in settlements:
        store.settle_now(settlement)
    return (time.perf_counter() - start) / n * 1e6


def write_cost(rows: int, writes: int = 50) -> float:
    """ms a write of ``rows`` changed rows (one transaction, synced) takes its thread."""
    with tempfile.TemporaryDirectory() as directory:
        file = LedgerFile(str(Path(directory) / "ledger.sqlite3"))
        file.open(today=20_000)
        changed = {
            ("team", f"model{i}", 20_000, "key"): (1, 40, 20, 0, 0, 123) for i in range(rows)
        }
        start = time.perf_counter()
        for _ in range(writes):
            file.add(changed)
        elapsed = (time.perf_counter() - start) / writes * 1e3
        file.close()
    return elapsed


def main(n: int = 200_000) -> None:
    for with_file in (False, True):  # the least of 7 runs each: the machine may be shared
        label = "with the file's counting" if with_file else "memory only"
        least = min(settle_cost(n, with_file) for _ in range(7))
        print(f"settle_now, {label}: {least:.2f} µs a settlement (least of 7 runs)")
    for rows in (1, 30, 300, 3000):
        print(f"a write of {rows} changed rows: {write_cost(rows):.2f} ms (its own thread)")


if __name__ == "__main__":
    main()
