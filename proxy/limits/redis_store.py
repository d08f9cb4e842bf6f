"""The limiter and ledger in Redis, shared by every proxy replica.

Every call is one script round trip (EVALSHA; EVAL once after a Redis restart), and
the admissions (and the settlements) of a team made in one loop turn share one
(redis/batch.py). Everything, the hot path (admit, settle, renew) and the rare ledger
reads alike, runs on the proxy's pipelined client (redis/client.py). Any Redis or
socket error becomes ``StoreUnavailable``: the caller falls back or refuses, and
queues settlements. The client does not retry, so a down Redis costs one short
timeout, not several.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.limits.lua import ADMIT, LEVELS, RENEW, SETTLE
from proxy.limits.store import (
    DAY,
    KIND_CODES,
    LEDGER_FIELDS,
    Admission,
    Check,
    LedgerRow,
    Settlement,
    StoreUnavailable,
    TeamChecks,
    Unconfirmed,
    amount,
    limit_state,
    period_end,
)
from proxy.redis.batch import BatchShape
from proxy.redis.protocol import Arg, Reply, RespError, Script, encode_items
from proxy.redis.router import Router

PREFIX = "llmproxy"
REPLICAS_RETRY = 1.0  # seconds between two WAITs once too few replicas answered
WAIT_MS = 50  # at most, per WAIT for ledger_replicas (RedisStore.__init__)


def team_key(team: str, *parts: str) -> str:
    """All keys of a team share the hash tag {team}: one Cluster slot per team."""
    return ":".join((PREFIX, f"{{{team}}}", *parts))


_KEY_KINDS = {"requests_per_minute": "rpm", "tokens_per_minute": "tpm", "concurrent": "conc",
              "tokens_per_day": "tpd", "daily_usd": "usd-day",
              "monthly_usd": "usd-month"}  # fmt: skip


def check_key(team: str, check: Check) -> str:
    return team_key(team, _KEY_KINDS[check.kind], check.scope)


def _check_args(checks: tuple[Check, ...]) -> list[Arg]:
    return [x for c in checks for x in (KIND_CODES[c.kind], c.limit)]


@dataclass(frozen=True)
class TeamParts:
    """What the script calls of one team's checks have in common, encoded once, when a
    config is loaded: every call then encodes only what is its own (request id, tokens,
    day). Encoding all of a call's keys and arguments anew was the largest Python cost
    of the Redis path."""

    route: str  # a key of the team: its hash tag names the team's Cluster slot
    admit: BatchShape  # KEYS: the checks' keys; ARGV: kind code and limit per check
    settle: BatchShape  # KEYS: the ledger index, the checks' keys; ARGV: as admit's
    renew: tuple[str, ...]  # the concurrency checks' keys, whose leases a long call renews

    @classmethod
    def of(cls, team: str, checks: tuple[Check, ...], admit: Script, settle: Script) -> TeamParts:
        keys = [check_key(team, c) for c in checks]
        limits = _check_args(checks)
        n = len(checks)
        return cls(
            team_key(team),
            BatchShape(admit, encode_items(keys), n, encode_items(limits), 2 * n, 0, 4),
            BatchShape(
                settle,
                encode_items((team_key(team, "ledger-index"), *keys)),
                1 + n,
                encode_items(limits),
                2 * n,
                2,
                11,
            ),
            tuple(k for k, c in zip(keys, checks, strict=True) if c.kind == "concurrent"),
        )


def _parts(team_checks: TeamChecks) -> TeamParts:
    parts = team_checks.encoded
    if not isinstance(parts, TeamParts):  # a TeamChecks another store prepared: a bug
        raise TypeError(f"checks of team {team_checks.team!r} not prepared by a RedisStore")
    return parts


def admit_args(lease: str, lease_ttl: float, reserved: int, cost: int = 0) -> bytes:
    """A call's own ADMIT arguments (it has no keys of its own)."""
    return encode_items((lease, lease_ttl, reserved, cost))


def settle_parts(s: Settlement) -> tuple[bytes, bytes]:
    """A call's own SETTLE keys (done marker, ledger hash) and arguments."""
    keys = encode_items(
        (team_key(s.team, "done", s.request_id), team_key(s.team, "ledger", str(s.day), s.model))
    )
    args = encode_items(
        (
            s.day,
            s.model,
            s.request_id,
            s.reserved,
            s.used,
            s.prompt_tokens,
            s.completion_tokens,
            1 if s.estimated else 0,
            s.cost,
            s.key,
            s.reserved_cost,
        )
    )
    return keys, args


_FAILURES = (RespError, OSError)  # Disconnected and TimeoutError are OSErrors


def _store_unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


def _unavailable(future: asyncio.Future[Reply]) -> StoreUnavailable | None:
    """A finished call's failure as the store reports it; anything else is a bug, raised."""
    error = future.exception()
    if error is None:
        return None
    if isinstance(error, _FAILURES):
        unavailable = _store_unavailable(error)
        unavailable.__cause__ = error
        return unavailable
    raise error


class RedisStore:
    def __init__(self, urls: str | Sequence[str], timeout: float, ledger_replicas: int = 0):
        self._admit, self._settle, self._renew, self._levels = (
            Script.of(s) for s in (ADMIT, SETTLE, RENEW, LEVELS)
        )
        scripts = (self._admit, self._settle, self._renew, self._levels)
        seeds = [urls] if isinstance(urls, str) else urls
        self.hot = Router(seeds, timeout, scripts)
        # With ledger_replicas, settlements go on connections of their own: WAIT holds
        # up the commands behind it, and admissions must not wait for replicas.
        self.ledger_replicas = ledger_replicas
        self._lane = "ledger" if ledger_replicas else ""
        # How long a WAIT may take: a replica in sync confirms within a round trip or
        # two, and meanwhile the settlements that follow are held (redis/client.py), with
        # their concurrency slots. What is not confirmed in time is sent again later.
        # Short of a quarter of the client's timeout: a settlement held behind one WAIT,
        # then under its own, stays well within it.
        self._wait_ms = max(1, min(WAIT_MS, int(timeout * 1000 / 4)))
        # Per team route: whether its node had enough replicas online and caught up when
        # last asked, and until when that holds. A WAIT goes only where they were: a
        # WAIT for replicas that are missing or syncing holds every command behind it on
        # its connection until it times out (seen: the concurrency slots held, and 429s,
        # while a promoted primary had no replica yet, or one still syncing).
        self._replicas_seen: dict[str, tuple[bool, float]] = {}

    async def close(self) -> None:
        await self.hot.close()

    async def _run(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except _FAILURES as exc:
            raise _store_unavailable(exc) from exc

    def prepare(self, team: str, checks: tuple[Check, ...]) -> TeamChecks:
        return TeamChecks(team, checks, TeamParts.of(team, checks, self._admit, self._settle))

    async def admit(
        self, team_checks: TeamChecks, reserved: int, lease: str, lease_ttl: float, cost: int = 0
    ) -> Admission:
        checks = team_checks.checks
        args = admit_args(lease, lease_ttl, reserved, cost)
        parts = _parts(team_checks)
        reply = await self._run(self.hot.run_batched(parts.route, parts.admit, b"", args))
        admitted, day, refused = int(reply[0]), int(reply[1]), int(reply[2])
        retry, now = float(reply[3]), float(reply[4])
        levels = [float(v) for v in reply[5:]]
        states = tuple(
            limit_state(c, v, amount(c, reserved, cost) if admitted else 0, now)
            for c, v in zip(checks, levels, strict=True)
        )
        if admitted:
            return Admission(True, day, states)
        check = checks[refused - 1]
        if retry < 0:  # a budget: until its day or month ends, on Redis's clock
            retry = period_end(check.kind, now) - now
        return Admission(False, day, states, refused=check, retry_after=retry)

    async def settle(self, s: Settlement) -> None:
        parts = _parts(s.team_checks)
        if not self._lane:
            await self._run(self.hot.run_batched(parts.route, parts.settle, *settle_parts(s)))
            return
        if await self._too_few_replicas(parts.route):
            await self._run(
                self.hot.run_batched(parts.route, parts.settle, *settle_parts(s), self._lane)
            )
            raise Unconfirmed(f"fewer than {self.ledger_replicas} replicas are connected")
        try:
            _, confirmed = await self._replicated_settle(parts, s)
        except StoreUnavailable:
            self._replicas_seen.pop(parts.route, None)  # a failover, maybe: ask again
            raise
        if confirmed < self.ledger_replicas:
            self._replicas_seen[parts.route] = (False, time.monotonic() + REPLICAS_RETRY)
            raise Unconfirmed(
                f"{confirmed} of {self.ledger_replicas} replicas confirmed a ledger write"
            )

    async def _replicated_settle(self, parts: TeamParts, s: Settlement) -> tuple[Reply, int]:
        return await self._run(  # type: ignore[no-any-return]
            self.hot.run_batched_replicated(
                parts.route,
                parts.settle,
                *settle_parts(s),
                self.ledger_replicas,
                self._wait_ms,
                self._lane,
            )
        )

    async def _too_few_replicas(self, route: str) -> bool:
        """Whether the team's node lacks replicas, as last seen: asked again (INFO
        replication, which does not block) every ``REPLICAS_RETRY`` seconds, and after a
        failure."""
        seen = self._replicas_seen.get(route)
        now = time.monotonic()
        if seen is not None and now < seen[1]:
            return not seen[0]
        if seen is not None:  # asked once at a time: meanwhile the last answer stands
            self._replicas_seen[route] = (seen[0], now + REPLICAS_RETRY)
        try:
            enough = await self._run(self.hot.replicas(route)) >= self.ledger_replicas
        except StoreUnavailable:
            self._replicas_seen.pop(route, None)
            raise
        self._replicas_seen[route] = (enough, time.monotonic() + REPLICAS_RETRY)
        return not enough

    def settle_soon(
        self, s: Settlement, done: Callable[[StoreUnavailable | None], None]
    ) -> asyncio.Future[Reply] | None:
        """``settle`` for a caller that does not wait for it: the script call joins this
        turn's batch at once and ``done`` gets its outcome. Returns the call's future, or
        None (nothing sent) when no connection is open yet, or when replicas must confirm
        the write (a task waits for that)."""
        if self._lane:
            return None
        parts = _parts(s.team_checks)
        future = self.hot.join_now(parts.route, parts.settle, *settle_parts(s))
        if future is not None:
            future.add_done_callback(lambda f: done(_unavailable(f)))
        return future

    async def renew(self, team_checks: TeamChecks, lease: str, ttl: float) -> None:
        keys = _parts(team_checks).renew
        if keys:
            await self._run(self.hot.run_script(self._renew, keys, [lease, math.ceil(ttl)]))

    async def levels(self, team: str, checks: tuple[Check, ...]) -> tuple[int, list[int]]:
        """The UTC day on Redis's clock, and what each per-period check of ``team``
        holds now (budgets: micro-dollars spent and held by calls in flight)."""
        if not checks:
            return int(time.time() // DAY), []
        keys = [check_key(team, c) for c in checks]
        reply = await self._run(
            self.hot.run_script(self._levels, keys, [KIND_CODES[c.kind] for c in checks])
        )
        return int(reply[0]), [int(v) for v in reply[2:]]

    async def ledger(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]:
        try:
            return [
                row for team in teams for row in await self._team_ledger(team, first_day, last_day)
            ]
        except _FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _team_ledger(self, team: str, first_day: int, last_day: int) -> list[LedgerRow]:
        entries: list[tuple[int, str]] = []
        for member in _strings(await self.hot.execute("SMEMBERS", team_key(team, "ledger-index"))):
            day_text, _, model = member.partition(":")
            if first_day <= int(day_text) <= last_day:
                entries.append((int(day_text), model))
        entries.sort()
        # Every day's hash in one write: the client pipelines a loop turn's commands.
        replies = await asyncio.gather(
            *(self.hot.execute("HGETALL", team_key(team, "ledger", str(d), m)) for d, m in entries)
        )
        return [
            _ledger_row(team, model, day, _strings(reply))
            for (day, model), reply in zip(entries, replies, strict=True)
        ]


def _ledger_row(team: str, model: str, day: int, flat: list[str]) -> LedgerRow:
    """A ledger hash (HGETALL: field, value, …): the totals, and the split by key label
    in the fields named ``FIELD@LABEL``."""
    totals: dict[str, int] = {}
    by_key: dict[str, dict[str, int]] = {}
    for name, value in zip(flat[::2], flat[1::2], strict=True):
        field, _, label = name.partition("@")
        (by_key.setdefault(label, {}) if label else totals)[field] = int(value)
    return LedgerRow(
        team,
        model,
        day,
        tuple(totals.get(f, 0) for f in LEDGER_FIELDS),
        tuple(
            (label, tuple(counts.get(f, 0) for f in LEDGER_FIELDS))
            for label, counts in sorted(by_key.items())
        ),
    )


def _strings(reply: Reply) -> list[str]:
    """An array reply of bulk strings (SMEMBERS, HGETALL), decoded."""
    if not isinstance(reply, list):
        raise RespError(f"expected an array from Redis, got {reply!r:.100}")
    return [item.decode() for item in reply if isinstance(item, bytes)]
