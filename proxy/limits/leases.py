"""Concurrency leases kept alive for as long as their calls run.

A ``concurrent`` limit's slot is a lease that expires ``lease_ttl`` after it was taken
or last renewed, so that a process that dies frees its slots. A call that outlives a
third of the ttl has its lease renewed. One ticker per process does that for every
call in flight, every sixth of the ttl, so a lease is renewed at an age between a
third and a half of its ttl. The ticker runs only while a lease is held, and a call
costs a dict entry rather than a timer of its own (a timer per call, armed and
cancelled, was 3 % of a worker's CPU at c=64 with Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from proxy.limits.store import Store, StoreUnavailable, TeamChecks


class _Lease:
    __slots__ = ("due", "store", "task", "team_checks")

    def __init__(self, store: Store, team_checks: TeamChecks, due: float) -> None:
        self.store, self.team_checks, self.due = store, team_checks, due
        self.task: asyncio.Task[None] | None = None


class LeaseRenewer:
    """The leases of this process's calls in flight, keyed by request id."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._leases: dict[str, _Lease] = {}
        self._ticker: asyncio.TimerHandle | None = None

    def hold(self, store: Store, team_checks: TeamChecks, lease: str) -> None:
        """Keep ``lease`` alive in ``store`` until ``release(lease)``."""
        self._leases[lease] = _Lease(store, team_checks, time.monotonic() + self._ttl / 3)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(self._ttl / 6, self._tick)

    def release(self, lease: str) -> None:
        held = self._leases.pop(lease, None)
        if held is not None and held.task is not None:
            held.task.cancel()  # the call is over: its slot goes with the settlement

    def _tick(self) -> None:
        now = time.monotonic()
        for lease, held in self._leases.items():
            if held.due <= now and (held.task is None or held.task.done()):
                held.due = now + self._ttl / 3
                held.task = asyncio.ensure_future(self._renew(held, lease))
        self._ticker = None
        if self._leases:
            self._ticker = asyncio.get_running_loop().call_later(self._ttl / 6, self._tick)

    async def _renew(self, held: _Lease, lease: str) -> None:
        # If Redis is down the lease expires: a slot is freed early, never leaked.
        with contextlib.suppress(StoreUnavailable):
            await held.store.renew(held.team_checks, lease, self._ttl)
