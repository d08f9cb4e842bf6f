"""All replicas of one engine provider: start and stop them, lend a ready one to a call.

A call leases a ready replica, chosen by the provider's ``balance`` from the call's
hint (routing/balance.py ``pick``; without one, the one with the fewest calls in flight,
ties rotating so that sequential calls spread too), and holds the lease until its last
byte is relayed. The prefix indexes of ``cache_aware`` live here, one per replica. A
call that finds no replica ready waits for one up to ``engine.wait`` and then gets a
503; it never hangs. An idle unload only happens when no call holds or waits for a
lease, and those counts change only between awaits, so the check cannot race a call.

Before its lease, a call takes one of the engine's slots (``admitted``): while every
slot is taken it waits in the engine's fair queue (engines/fair_queue.py), and a call
waiting there keeps the engine busy too. The slots are the replicas': a call admitted
because one replica has a free slot goes to a replica with a free slot, except under
``cache_aware``, which may stack it on a busy replica that holds its prefix (a prefill
elsewhere costs more than the wait there; its imbalance threshold bounds how many). Such
a call waits in that engine's own queue and leaves the free slot it was admitted to for
the next call in the fair queue, so no replica idles while calls wait that it could serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from proxy.config.engine import EngineSpec
from proxy.engines.fair_queue import FairQueue, QueueObserver
from proxy.engines.replica import Replica
from proxy.errors import EngineUnavailable
from proxy.routing.balance import Hint, pick
from proxy.routing.cache_aware import Choice, PrefixRouter

log = logging.getLogger(__name__)

# The balances that may send a call to a replica whose slots are all taken: affinity
# ignores load by design (such a call holds its pooled slot while it waits there), and
# cache_aware weighs the replica's cache against its load.
_STACKING = frozenset({"affinity", "cache_aware"})


class EngineSupervisor:
    def __init__(
        self,
        name: str,
        spec: EngineSpec,
        session: aiohttp.ClientSession,
        observer: QueueObserver | None = None,
    ):
        self.name = name
        self.spec = spec
        self.replicas = [
            Replica(name, i, spec, session, self._changed) for i in range(spec.replicas)
        ]
        self.running = False
        self.waiting = 0
        self.queue = FairQueue(name, spec.queue, self._capacity, observer)
        self.last_used = time.monotonic()
        self.unloads = 0  # idle unloads, for the metrics hook
        self._change = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None
        self._turn = 0
        self._stacked = 0  # calls cache_aware leased to a replica with no slot free
        self.prefixes = PrefixRouter()

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def busy(self) -> bool:
        return self.in_flight > 0 or self.waiting > 0 or self.queue.depth > 0

    def start(self) -> None:
        if not self.running:
            log.info("engine %s: starting %d replica(s)", self.name, len(self.replicas))
        self.running = True
        self.last_used = time.monotonic()
        for replica in self.replicas:
            replica.start()

    async def stop(self) -> None:
        self.running = False
        # A stop already under way is joined, not started again: a second stop would
        # find the replicas' tasks already taken and return before their processes are
        # reaped (the app's shutdown then closes the loop under them).
        if self._stopping is None or self._stopping.done():
            self._stopping = asyncio.create_task(self._stop_all())
        await asyncio.shield(self._stopping)

    async def _stop_all(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.replicas))

    @contextlib.asynccontextmanager
    async def lease(self, hint: Hint | None = None) -> AsyncIterator[tuple[Replica, Choice | None]]:
        """The replica that serves the call, and cache_aware's estimate of its prefix hit."""
        self.waiting += 1
        try:
            replica, choice = await self._ready_replica(hint)
        finally:
            self.waiting -= 1
        # Only cache_aware's choice (it comes with a Choice) gives its slot back: its
        # imbalance threshold bounds how many calls stack, affinity's hashing does not.
        stacked = choice is not None and replica.in_flight >= self.spec.slots
        replica.in_flight += 1
        self.last_used = time.monotonic()
        if stacked:
            self._stacked += 1
            self.queue.pump()  # the slot it was admitted to is still free: pass it on
        try:
            yield replica, choice
        finally:
            replica.in_flight -= 1
            self._stacked -= stacked
            self.last_used = time.monotonic()

    async def _ready_replica(self, hint: Hint | None) -> tuple[Replica, Choice | None]:
        if self._stopping is not None and not self._stopping.done():
            await asyncio.shield(self._stopping)  # an unload in progress: then start again
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.wait
        while (chosen := self._choose(hint)) is None:
            if self.failing():
                raise EngineUnavailable(self._failing_message())
            change = self._change  # set and replaced on every replica state change
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await change.wait()
            # Not _choose: it records the call (cache_aware), and the loop chooses again.
            if loop.time() >= deadline and all(r.state != "ready" for r in self.replicas):
                raise EngineUnavailable(self._not_ready_message())
        return chosen

    def _choose(self, hint: Hint | None) -> tuple[Replica, Choice | None] | None:
        n = len(self.replicas)
        # The ready ones in rotation order from the turn, so that ties rotate.
        ready = sorted(
            (r for r in self.replicas if r.state == "ready"),
            key=lambda r: (r.index - self._turn) % n,
        )
        if not ready:
            return None
        free = [r for r in ready if r.in_flight < self.spec.slots]
        if free and (hint is None or hint.balance not in _STACKING):
            ready = free  # the rotation's order kept: round_robin goes on from its turn
        at, choice = pick(
            hint, [str(r.index) for r in ready], [r.in_flight for r in ready], self.prefixes
        )
        self._turn = (ready[at].index + 1) % n
        return ready[at], choice

    def failing(self) -> bool:
        """No start is under way: every replica waits out its backoff after an exit or
        a failed start. A call would wait for nothing, so it is refused at once; the
        wait (``engine.wait``) is for a start in progress."""
        return all(r.state == "backoff" for r in self.replicas)

    def describe(self) -> str:
        """Each replica's state, and why it last exited: ``#0 backoff (last: …)``."""
        return ", ".join(
            f"#{r.index} {r.state}" + (f" (last: {r.stats.last_exit})" if r.stats.last_exit else "")
            for r in self.replicas
        )

    def _failing_message(self) -> str:
        return (
            f"Local engine '{self.name}' cannot serve now: no replica is running or "
            f"starting (replicas: {self.describe()}). It is restarted in the background; "
            "try again shortly."
        )

    def _not_ready_message(self) -> str:
        return (
            f"Local engine '{self.name}' is not ready after waiting {self.spec.wait:g}s "
            f"(replicas: {self.describe()}). Try again shortly."
        )

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()
        self.queue.pump()  # a replica up or down: the slots changed

    async def unload_if_idle(self) -> bool:
        idle = self.spec.idle_unload
        if not self.running or idle is None or self.busy():
            return False
        if time.monotonic() - self.last_used < idle:
            return False
        log.info("engine %s: unloading after %gs idle", self.name, idle)
        self.unloads += 1
        await self.stop()
        return True

    @contextlib.asynccontextmanager
    async def admitted(
        self, team: str = "", weight: float = 1.0, deadline: float | None = None
    ) -> AsyncIterator[None]:
        """One slot for the call's length, after its turn in the fair queue; raises
        ``EngineBusy`` (429) when the queue refuses it or the call's ``deadline`` comes."""
        if self.failing():  # a queue place would only delay the same 503
            raise EngineUnavailable(self._failing_message())
        async with self.queue.slot(team, weight, deadline):
            yield

    def _capacity(self) -> int:
        """Slots of the replicas that serve or will soon; one replica's while none does
        (the call then waits for a start, or is refused, in ``_ready_replica``). Plus
        the calls stacked on a busy replica: they hold none of these slots."""
        up = sum(r.state in ("ready", "starting") for r in self.replicas)
        return self.spec.slots * max(1, up) + self._stacked

    def reconfigure(self, spec: EngineSpec) -> None:
        """A reload that changed only slots or the queue: no restart, waiters see it now."""
        self.spec = spec
        self.queue.configure(spec.queue)
