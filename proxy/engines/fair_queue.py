"""Fair admission to one engine's slots: a bounded queue, weighted fair between teams.

A slot is one call the engine serves at once (``engine.slots`` per ready or starting
replica). A call that finds a slot free and nobody waiting takes it at once; otherwise
it waits in the queue, at most ``engine.queue.max`` calls, each at most
``engine.queue.wait`` seconds (less if the call's own time budget ends sooner), and is
refused with a 429 (``EngineBusy``) beyond either, with a Retry-After from the measured
drain rate.

The order is start-time fair queuing (Goyal, Vin and Cheng, 1996) with every call
costing one: a waiting call's start tag is ``max(V, its team's last finish tag)``
and its finish tag that plus ``1/weight``, where V is the start tag of the call
admitted last; the lowest start tag goes first (ties: first come). A team that
queues ten calls at once gets start tags V … V+9; another team's one call gets V and
goes next, not eleventh, so a burst cannot starve anyone, and a team of weight 3 gets
three calls in for another's one while both wait. Tags are forgotten when the queue
empties: an idle engine owes nobody anything.

A full queue is fair too (longest queue drop): a call that finds it full takes the
place of the newest call of the team holding the most places for its weight, which
gets the 429 instead, unless its own team already holds the most. So a team whose
flood fills the queue is refused, not the others.

The drain rate is measured, not configured: an exponentially weighted mean of how
long calls hold a slot, so the engine drains ``capacity / hold`` calls a second.
Everything here runs on the event loop between awaits, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from proxy.config.engine import QueueSpec
from proxy.errors import EngineBusy, retry_seconds

_PUSHED_OUT = (
    "its queue is full and this call's team holds the most places, so its place went "
    "to another team's call"
)
# How much of the mean hold time one call's moves it: about the last ten calls count.
_SMOOTHING = 0.2


class QueueObserver(Protocol):
    """Where the queue's numbers go (observe/metrics.py's ``Metrics``)."""

    def engine_queued(self, engine: str, team: str, change: int) -> None: ...
    def engine_waited(self, engine: str, team: str, seconds: float, outcome: str) -> None: ...


@dataclass(eq=False)
class _Waiter:
    team: str
    weight: float
    tag: float  # its start tag
    enqueued: float
    granted: asyncio.Future[None]
    deadline: float | None  # the call's own, on time.monotonic(): it waits no longer
    timer: asyncio.TimerHandle | None = None
    gone: bool = False  # admitted, refused or left: its heap entry is skipped


@dataclass
class _Counts:
    """Mutable on purpose: the queue's bookkeeping, changed only on the loop."""

    serving: int = 0
    queued: int = 0
    per_team: dict[str, list[_Waiter]] = field(default_factory=dict)  # oldest first
    last_finish: dict[str, float] = field(default_factory=dict)
    virtual: float = 0.0
    sequence: int = 0
    hold: float | None = None  # seconds a call holds a slot, smoothed; None: none yet


class FairQueue:
    def __init__(
        self,
        engine: str,
        settings: QueueSpec,
        capacity: Callable[[], int],
        observer: QueueObserver | None = None,
    ):
        self.engine = engine
        self.settings = settings
        self._capacity = capacity  # slots now: it follows the replicas' states
        self._observer = observer
        self._counts = _Counts()
        self._heap: list[tuple[float, int, _Waiter]] = []

    @property
    def depth(self) -> int:
        return self._counts.queued

    @property
    def serving(self) -> int:
        return self._counts.serving

    def depth_of(self, team: str) -> int:
        return len(self._counts.per_team.get(team, ()))

    @contextlib.asynccontextmanager
    async def slot(
        self, team: str, weight: float, deadline: float | None = None
    ) -> AsyncIterator[None]:
        """Hold one slot for the block; raises ``EngineBusy`` when refused, or when the
        call's ``deadline`` (``time.monotonic()``) comes while it waits."""
        await self._acquire(team, weight, deadline)
        began = time.monotonic()
        try:
            yield
        except BaseException:
            raise  # no replica got ready, or the client left: not the engine's pace
        else:
            self._held(time.monotonic() - began)
        finally:
            self._counts.serving -= 1
            self.pump()

    def configure(self, settings: QueueSpec) -> None:
        """A reload's new settings, for the calls waiting now too: their wait counts from
        when they came, so a shorter one may refuse them at once."""
        self.settings = settings
        for _, _, waiter in self._heap:
            if not waiter.gone:
                self._arm(waiter)
        self.pump()

    def pump(self) -> None:
        """Admit waiters, lowest tag first, while slots are free (after a release, a
        replica's start, or a reload)."""
        counts = self._counts
        while self._heap and counts.serving < self._capacity():
            tag, _, waiter = heapq.heappop(self._heap)
            if waiter.gone:
                continue
            if waiter.granted.done():  # cancelled, its task not yet resumed to leave
                self._leave(waiter, "cancelled")
                continue
            counts.virtual = tag
            self._leave(waiter, "admitted")
            counts.serving += 1
            waiter.granted.set_result(None)
        if not counts.queued:
            self._heap.clear()
            counts.last_finish.clear()

    def estimated_wait(self, team: str) -> float:
        """Seconds a call of ``team`` coming now would wait: 0 with a slot free; else its
        place in the fair order (the waiting calls whose start tag is not above the one
        it would get) times the measured hold, over the slots. With no hold measured
        yet, the most it could wait (``queue.wait``)."""
        counts = self._counts
        capacity = max(1, self._capacity())
        if not counts.queued and counts.serving < capacity:
            return 0.0
        if counts.hold is None:
            return self.settings.wait
        tag = max(counts.virtual, counts.last_finish.get(team, counts.virtual))
        ahead = sum(1 for t, _, w in self._heap if t <= tag and not w.gone)
        return (ahead + 1) * counts.hold / capacity

    def retry_after(self, team: str) -> float:
        """When a refused call of ``team`` may find room: the calls ahead of it drained."""
        return min(self.estimated_wait(team) or 1.0, 3600.0)

    async def _acquire(self, team: str, weight: float, deadline: float | None) -> None:
        counts = self._counts
        if not counts.queued and counts.serving < self._capacity():
            counts.serving += 1
            self._tell_waited(team, 0.0, "admitted")
            return
        if counts.queued >= self.settings.max:
            pushed_out = self._pushed_out(team, weight)
            if pushed_out is None:
                self._tell_waited(team, 0.0, "full")
                raise self._busy(team, f"its {self.settings.max} queue places are taken")
            self._refuse(pushed_out, "full", _PUSHED_OUT)
        waiter = self._enqueue(team, weight, deadline)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Admitted in the loop turn the client left in: pass the slot on.
                counts.serving -= 1
                self.pump()
            elif not waiter.gone:
                self._leave(waiter, "cancelled")
            raise

    def _enqueue(self, team: str, weight: float, deadline: float | None) -> _Waiter:
        counts = self._counts
        tag = max(counts.virtual, counts.last_finish.get(team, counts.virtual))
        counts.last_finish[team] = tag + 1.0 / weight
        loop = asyncio.get_running_loop()
        waiter = _Waiter(team, weight, tag, time.monotonic(), loop.create_future(), deadline)
        counts.sequence += 1
        heapq.heappush(self._heap, (tag, counts.sequence, waiter))
        counts.queued += 1
        counts.per_team.setdefault(team, []).append(waiter)
        if self._observer is not None:
            self._observer.engine_queued(self.engine, team, 1)
        self._arm(waiter)
        return waiter

    def _arm(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        remaining = self._expiry(waiter) - time.monotonic()
        loop = asyncio.get_running_loop()
        waiter.timer = loop.call_later(max(0.0, remaining), self._expire, waiter)

    def _expiry(self, waiter: _Waiter) -> float:
        ends = waiter.enqueued + self.settings.wait
        return ends if waiter.deadline is None else min(ends, waiter.deadline)

    def _pushed_out(self, team: str, weight: float) -> _Waiter | None:
        """The newest call of the team holding the most places for its weight, unless
        the caller's team, counting the caller, holds as many."""
        counts = self._counts
        mine = (len(counts.per_team.get(team, ())) + 1) / weight
        most, waiters = max(
            ((len(w) / w[-1].weight, w) for t, w in counts.per_team.items() if t != team),
            key=lambda pair: pair[0],
            default=(0.0, []),
        )
        return waiters[-1] if waiters and most > mine else None

    def _expire(self, waiter: _Waiter) -> None:
        why = f"no slot came free within {self.settings.wait:g}s of queueing"
        if waiter.deadline is not None and waiter.deadline < waiter.enqueued + self.settings.wait:
            why = "no slot came free before the call's time budget ran out"
        self._refuse(waiter, "timeout", why)

    def _refuse(self, waiter: _Waiter, outcome: str, why: str) -> None:
        if waiter.gone:
            return
        if waiter.granted.done():  # cancelled, its task not yet resumed to leave
            self._leave(waiter, "cancelled")
            return
        self._leave(waiter, outcome)
        waiter.granted.set_exception(self._busy(waiter.team, why))

    def _leave(self, waiter: _Waiter, outcome: str) -> None:
        counts = self._counts
        waiter.gone = True
        if waiter.timer is not None:
            waiter.timer.cancel()
        counts.queued -= 1
        waiters = counts.per_team[waiter.team]
        waiters.remove(waiter)
        if not waiters:
            del counts.per_team[waiter.team]
        if self._observer is not None:
            self._observer.engine_queued(self.engine, waiter.team, -1)
        self._tell_waited(waiter.team, time.monotonic() - waiter.enqueued, outcome)

    def _held(self, seconds: float) -> None:
        hold = self._counts.hold
        self._counts.hold = seconds if hold is None else hold + _SMOOTHING * (seconds - hold)

    def _tell_waited(self, team: str, seconds: float, outcome: str) -> None:
        if self._observer is not None:
            self._observer.engine_waited(self.engine, team, seconds, outcome)

    def _busy(self, team: str, why: str) -> EngineBusy:
        retry = self.retry_after(team)
        message = (
            f"Local engine '{self.engine}' is at capacity: {why}. "
            f"Retry after {retry_seconds(retry)}s."
        )
        return EngineBusy(message, retry_after=retry)
