"""Steps 4 and 6 of a call: admission against the team's limits, settlement into the ledger.

Admission reserves tokens (prompt estimate + max_tokens, or the configured default)
and takes every limit in one store call; settlement corrects the reservation with the
real usage and books it, once per request however many attempts the call made. When
Redis fails, admission falls back to this process's own limits (``fail_open``) or
refuses with 503 (``fail_closed``); settlements Redis cannot take are queued and
written when Redis is back, and a shutdown flushes the queue. With
``redis.ledger_replicas``, a settlement the primary applied but too few replicas
confirmed is kept apart and sent again until they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

from proxy.config.model import Config, RedisSettings
from proxy.errors import LimiterUnavailable
from proxy.limits.budget_report import budget_rows
from proxy.limits.leases import LeaseRenewer
from proxy.limits.memory import MemoryStore
from proxy.limits.plan import LimitPlan
from proxy.limits.redis_store import RedisStore
from proxy.limits.refusal import refusal
from proxy.limits.store import (
    BUDGETS,
    DAY,
    NO_KEY,
    Admission,
    Settlement,
    Store,
    StoreUnavailable,
    TeamChecks,
    Unconfirmed,
)
from proxy.limits.usage import Usage
from proxy.observe.metrics import Metrics

log = logging.getLogger(__name__)

FLUSH_CHUNK = 256  # queued settlements sent again in one loop turn


@dataclass(frozen=True)
class Ticket:
    """What admission took for one call, and what settling it needs."""

    team: str
    model: str
    request_id: str
    team_checks: TeamChecks
    reserved: int
    prompt_estimate: int
    admission: Admission
    fallback: bool = False  # admitted by this process's own limits while Redis was down
    reserved_cost: int = 0  # micro-dollars its budgets hold until settlement


class Accountant:
    def __init__(
        self,
        settings: RedisSettings,
        primary: Store,
        fallback: MemoryStore | None,
        redis_metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.primary = primary
        self.fallback = fallback  # None when the primary already is this process's memory
        self.redis_metrics = redis_metrics  # set when the primary is Redis
        self.queue: deque[Settlement] = deque()
        # Applied by the primary, not yet confirmed by ledger_replicas replicas: sent
        # again until they are. They hold nothing up, as their limits are corrected.
        self.unconfirmed: deque[Settlement] = deque()
        self.redis_errors = 0
        self.fallback_admissions = 0
        self._last_warning = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.leases = LeaseRenewer(settings.lease_ttl)
        self._sending: set[asyncio.Future[Any]] = set()  # settlements sent without a task
        self._queued = 0  # settle_soon() callbacks not run yet
        self._loop: asyncio.AbstractEventLoop | None = None  # not get_running_loop() per call
        # The running config's limits, compiled when it is first used, and the previous
        # config's: calls that began before a reload still admit by the limits they read.
        self._plan: LimitPlan | None = None
        self._previous: LimitPlan | None = None

    def track(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` to the end even if its caller is cancelled; shutdown waits for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tracked_done)
        return task

    def _tracked_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Nobody awaits the task: an error it did not handle itself is logged here, not
        # left to the garbage collector's "exception was never retrieved".
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("settlement failed", exc_info=error)

    async def admit(
        self, config: Config, team: str, model: str, reserved: int, prompt: int, request_id: str,
        cost: int = 0,
    ) -> Ticket:  # fmt: skip
        """``cost``: the call's worst case in micro-dollars, which its budgets hold."""
        checks = self._plan_of(config).checks(team, model)
        ticket = Ticket(
            team, model, request_id, checks, reserved, prompt,
            Admission(True, int(time.time() // DAY)), reserved_cost=cost,
        )  # fmt: skip
        if not checks.checks:
            return ticket
        try:
            with self._timed("admit"):
                admission = await self.primary.admit(
                    checks, reserved, request_id, self.settings.lease_ttl, cost
                )
        except StoreUnavailable as exc:
            return await self._admit_without_redis(ticket, exc)
        ticket = replace(ticket, admission=admission)
        if not admission.admitted:
            raise refusal(admission, reserved, cost)
        return ticket

    async def budgets(self, config: Config, team: str) -> list[dict[str, Any]]:
        """What is left of each budget of ``team`` now (GET /v1/usage)."""
        checks = self._plan_of(config).budgets(team)
        day, levels = await self.primary.levels(team, checks)
        return budget_rows(checks, day, levels)

    def _plan_of(self, config: Config) -> LimitPlan:
        plan = self._plan
        if plan is not None and plan.config is config:
            return plan
        if self._previous is not None and self._previous.config is config:
            return self._previous
        # A config not seen before (the first call, or the first after a reload).
        self._previous, self._plan = plan, LimitPlan(config, self.primary)
        return self._plan

    async def _admit_without_redis(self, ticket: Ticket, exc: StoreUnavailable) -> Ticket:
        self._redis_failed("admission", exc)
        if self.fallback is None or self.settings.on_error == "fail_closed":
            raise LimiterUnavailable(
                "The rate limiter is unavailable and this proxy is set to fail closed."
            ) from None
        self.fallback_admissions += 1
        admission = await self.fallback.admit(
            ticket.team_checks,
            ticket.reserved,
            ticket.request_id,
            self.settings.lease_ttl,
            ticket.reserved_cost,
        )
        ticket = replace(ticket, admission=admission, fallback=True)
        if not admission.admitted:
            raise refusal(admission, ticket.reserved, ticket.reserved_cost)
        return ticket

    async def _settle(self, ticket: Ticket, settlement: Settlement) -> None:
        if ticket.fallback and self.fallback is not None:
            await self.fallback.settle(settlement)  # its limits live here; the ledger does not
            # To Redis: the ledger, and the cost to the budgets (they held nothing there).
            budgets = tuple(c for c in ticket.team_checks.checks if c.kind in BUDGETS)
            settlement = replace(
                settlement, team_checks=self.primary.prepare(ticket.team, budgets), reserved_cost=0
            )
            if self.queue:  # a ledger-only write: in order, behind those waiting for Redis
                self.queue.append(settlement)
                return
        # A call admitted through Redis holds its limits there (a concurrency slot):
        # its settlement goes at once, never behind a backlog left by an outage (seen:
        # every slot held, and 429s, until thousands of ledger-only writes went out).
        # The ledger's sums do not depend on the order of its writes.
        try:
            with self._timed("settle"):
                await self.primary.settle(settlement)
        except Unconfirmed as exc:
            self._redis_failed("settlement", exc)
            self.unconfirmed.append(settlement)
        except StoreUnavailable as exc:
            self._redis_failed("settlement", exc)
            self.queue.append(settlement)

    def settle_soon(self, ticket: Ticket, usage: Usage, cost: int = 0, key: str = NO_KEY) -> None:
        """Settle once the loop's current step is over: after the answer this step
        writes, before anything the process reads later. A client that went away cannot
        cancel its own billing (nothing here waits), and the answer does not wait for
        the bookkeeping, nor, against Redis, for a second round trip.

        The callback is queued now; what the process reads meanwhile only queues work
        behind it (the loop runs ready callbacks in order). So a settlement is applied,
        or against Redis joins this turn's batch, before any later call of this process
        is admitted: on the shared connection Redis runs them in that order, and a team
        at its concurrency limit finds the slot of the call it was just answered freed.
        Shutdown and ledger reads wait for what is in flight."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._queued += 1
        settlement = _settlement(ticket, usage, cost, key)
        self._loop.call_soon(self._settle_queued, ticket, settlement)

    def _settle_queued(self, ticket: Ticket, settlement: Settlement) -> None:
        self._queued -= 1
        if isinstance(self.primary, MemoryStore):
            self.primary.settle_now(settlement)  # no I/O, nothing to wait for
        elif ticket.fallback or not self._send(settlement):
            # Fallback limits, or no connection yet (or replicas to wait for): a task.
            self.track(self._settle(ticket, settlement))

    def _send(self, settlement: Settlement) -> bool:
        """The common case against Redis, without a task: the script call joins this
        turn's batch and a callback takes its outcome. False when it cannot (no Redis
        connection yet: the task opens one)."""
        if not isinstance(self.primary, RedisStore):
            return False
        start = time.perf_counter()

        def done(error: StoreUnavailable | None) -> None:
            self._sending.discard(future)
            if self.redis_metrics is not None:
                self.redis_metrics.redis_call(
                    "settle", time.perf_counter() - start, ok=error is None
                )
            if error is not None:
                self._redis_failed("settlement", error)
                self.queue.append(settlement)

        future = self.primary.settle_soon(settlement, done)
        if future is None:
            return False
        self._sending.add(future)
        return True

    async def _in_flight(self) -> set[asyncio.Future[Any]]:
        """The settlements under way, once the settle_soon() callbacks queued so far ran
        (they are ahead of this coroutine's next step)."""
        if self._queued:
            await asyncio.sleep(0)
        return {*self._tasks, *self._sending}

    async def settled(self) -> None:
        """Wait for the settlements this process has started."""
        if in_flight := await self._in_flight():
            await asyncio.wait(in_flight)

    async def flush(self) -> bool:
        """Write queued settlements in order, then send the unconfirmed ones again; True
        when none is left. Up to ``FLUSH_CHUNK`` leave in one loop turn: on one
        connection Redis runs them in that order, and a backlog of thousands is not
        sent one round trip at a time."""
        while self.queue:
            chunk = [self.queue.popleft() for _ in range(min(len(self.queue), FLUSH_CHUNK))]
            failed, unconfirmed = await self._send_again(chunk)
            self.unconfirmed.extend(unconfirmed)
            if failed:
                self.queue.extendleft(reversed(failed))  # in their order, at the front
                return False
        # Applied already, so they hold nothing up: a chunk at a time, until replicas
        # confirm none of one (they are still missing) or Redis fails.
        for _ in range(len(self.unconfirmed) // FLUSH_CHUNK + 1):
            chunk = [
                self.unconfirmed.popleft() for _ in range(min(len(self.unconfirmed), FLUSH_CHUNK))
            ]
            failed, unconfirmed = await self._send_again(chunk)
            self.unconfirmed.extend(failed + unconfirmed)
            if len(failed) + len(unconfirmed) == len(chunk):
                break
        return not self.queue and not self.unconfirmed

    async def _send_again(self, chunk: list[Settlement]) -> tuple[list[Settlement], ...]:
        """Send ``chunk`` in one turn: what Redis did not take, and what it took but
        too few replicas confirmed."""
        start = time.perf_counter()
        outcomes = await asyncio.gather(
            *(self.primary.settle(s) for s in chunk), return_exceptions=True
        )
        if self.redis_metrics is not None:  # one round trip: an error if any failed
            ok = not any(isinstance(o, StoreUnavailable) for o in outcomes)
            self.redis_metrics.redis_call("flush", time.perf_counter() - start, ok=ok)
        failed, unconfirmed = [], []
        for settlement, outcome in zip(chunk, outcomes, strict=True):
            if isinstance(outcome, Unconfirmed):
                unconfirmed.append(settlement)
            elif isinstance(outcome, StoreUnavailable):
                failed.append(settlement)
            elif isinstance(outcome, BaseException):
                raise outcome
        return failed, unconfirmed

    async def flush_forever(self, interval: float = 0.5) -> None:
        while True:
            await asyncio.sleep(interval)
            if (self.queue or self.unconfirmed) and await self.flush():
                log.info("ledger queue flushed: Redis is back")

    async def drain(self, deadline: float) -> None:
        """On shutdown: finish settlements, flush what is queued, log what cannot be."""
        end = time.monotonic() + deadline
        if in_flight := await self._in_flight():
            await asyncio.wait(in_flight, timeout=deadline)
        while not await self.flush() and time.monotonic() < end:  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(0.2)
        for settlement in self.queue:
            log.error("ledger write lost at shutdown: %s", json.dumps(settlement.described()))
        for settlement in self.unconfirmed:
            log.warning(
                "ledger write not confirmed by %d replicas at shutdown: %s",
                self.settings.ledger_replicas,
                json.dumps(settlement.described()),
            )

    def _timed(self, operation: str) -> contextlib.AbstractContextManager[None]:
        if self.redis_metrics is None:
            return contextlib.nullcontext()
        return self.redis_metrics.redis_timer(operation)

    def _redis_failed(self, what: str, exc: StoreUnavailable) -> None:
        self.redis_errors += 1
        now = time.monotonic()
        if now - self._last_warning > 1.0:  # once a second, not once a request
            self._last_warning = now
            log.warning(
                "redis failed during %s (%d errors so far): %s", what, self.redis_errors, exc
            )


def _settlement(ticket: Ticket, usage: Usage, cost: int, key: str) -> Settlement:
    return Settlement(
        request_id=ticket.request_id,
        team_checks=ticket.team_checks,
        model=ticket.model,
        day=ticket.admission.day,
        reserved=ticket.reserved,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        estimated=usage.estimated,
        cost=cost,
        key=key,
        reserved_cost=ticket.reserved_cost,
    )


class LeaseKeeper:
    """``with LeaseKeeper(accountant, ticket):`` keeps the call's concurrency leases
    alive while it runs (proxy/limits/leases.py); short calls end before the first renewal
    and cost no extra round trip."""

    __slots__ = ("_accountant", "_held", "_ticket")

    def __init__(self, accountant: Accountant, ticket: Ticket):
        self._accountant, self._ticket = accountant, ticket
        self._held = False

    def __enter__(self) -> LeaseKeeper:
        ticket, accountant = self._ticket, self._accountant
        if any(c.kind == "concurrent" for c in ticket.team_checks.checks):
            fallback = accountant.fallback
            store = fallback if ticket.fallback and fallback else accountant.primary
            accountant.leases.hold(store, ticket.team_checks, ticket.request_id)
            self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._accountant.leases.release(self._ticket.request_id)
