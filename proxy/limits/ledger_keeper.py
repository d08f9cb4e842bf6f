"""Keeps the embedded ledger in its file (limits/ledger_file.py): restores it at start,
adds what was settled since the last write every ``accounting.ledger_interval`` and
once more at shutdown, and reads it for /v1/usage. Every file call runs in one thread
of its own, in the order made, so the loop never waits for a commit. A write that
fails is logged and counted (``llm_proxy_ledger_file_writes_total{result="error"}``),
and its rows are written by the next one: calls go on, the ledger in memory is whole.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from asyncio import Future
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from proxy.limits.ledger_file import LedgerFile, LedgerFileError
from proxy.limits.memory import MemoryStore
from proxy.limits.store import DAY, Addition, LedgerRow, totals
from proxy.observe.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
WARN_EVERY = 10.0  # seconds between two warnings of failing writes (each one is counted)


class LedgerKeeper:
    def __init__(
        self, store: MemoryStore, file: LedgerFile, interval: float, metrics: Metrics
    ) -> None:
        self.store = store
        self.file = file
        self.interval = interval
        self.metrics = metrics
        self.failed_writes = 0
        self._last_warning = -WARN_EVERY
        # One thread: the file's calls run one at a time, in the order they were made.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-file")

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    async def open(self) -> int:
        """Open the file and restore its recent rows into the store: how many."""
        rows = await self._run(self.file.open, int(time.time() // DAY))
        self.store.restore(rows)
        self.store.take_unwritten()  # from now on, settlements are counted for the file
        return len(rows)

    async def write(self) -> bool:
        """Add what was settled since the last write; False if the file refused it."""
        additions = self.store.take_unwritten()
        if not additions:
            return True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._thread, self._add, additions)
        # The outcome is taken by a callback, and the write shielded: one under way is
        # never abandoned (the writer cancelled at shutdown, a reader gone), and what it
        # did not add is added by the next.
        future.add_done_callback(functools.partial(self._written, additions))
        return await asyncio.shield(future) is None

    def _add(self, additions: list[Addition]) -> LedgerFileError | None:
        """In the file's thread: the additions summed per row, and added."""
        try:
            self.file.add(totals(additions))
        except LedgerFileError as exc:
            return exc
        return None

    def _written(self, additions: list[Addition], future: Future[LedgerFileError | None]) -> None:
        error = future.exception() or future.result()
        if error is None:
            self.metrics.ledger_file_written(ok=True)
            return
        self.store.unwritten_again(totals(additions).items())  # one per row, kept
        if isinstance(error, LedgerFileError):
            self._failed(error)

    def _failed(self, exc: LedgerFileError) -> None:
        self.failed_writes += 1
        self.metrics.ledger_file_written(ok=False)
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.error(
                "ledger not written (%d failed writes so far; kept in memory, tried again "
                "every %ss): %s", self.failed_writes, self.interval, exc,
            )  # fmt: skip

    async def write_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.write()
            except Exception:  # a fault of our own: shown, and the writes go on
                log.exception("ledger file write failed")

    async def ledger(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]:
        """Every worker's rows: this one's as of now, the others' as of their last write."""
        await self.write()
        return await self._run(self.file.read, teams, first_day, last_day)

    async def close(self) -> None:
        """At shutdown, after the last settlement: the last write, then the file closed."""
        if not await self.write():
            lost = len(self.store.take_unwritten())
            log.error(
                "ledger file %s: %d rows changed since the last write lost", self.file.path, lost
            )
        await self._run(self.file.close)
        self._thread.shutdown(wait=True)

    def where(self) -> dict[str, Any]:
        """What /v1/usage says of where the ledger lives."""
        return {"store": "sqlite", "path": self.file.path, "interval": self.interval}
