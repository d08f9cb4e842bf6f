"""The limiter and ledger in this process: the embedded default, and the fail-open
fallback when Redis is down. Same semantics as the Lua scripts in limits/lua.py, with
the shared arithmetic of store.py (``wait_for``, ``limit_state``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from proxy.limits.store import (
    DAY,
    LEDGER_FIELDS,
    PER_MINUTE,
    Addition,
    Admission,
    Check,
    LedgerKey,
    LedgerRow,
    Settlement,
    TeamChecks,
    ledger_rows,
    limit_state,
    wait_for,
)

# The tokens a settlement adds to tokens_per_day (Settlement.used), reported or estimated.
TOKEN_FIELDS = tuple(i for i, name in enumerate(LEDGER_FIELDS) if name.endswith("_tokens"))

DONE_TTL = DAY  # how long a settled request id is remembered, against double counting
# ... but at most this many: a duplicate settlement follows its first within seconds (a
# retry), so the most recent ids are the ones worth remembering, and memory stays flat
# however many calls a day brings (a whole day of ids grew without bound, and pruning
# them rebuilt a dict of 100k entries on every settlement).
DONE_MAX = 10_000


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._buckets: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._leases: dict[tuple[str, str], dict[str, float]] = {}
        self._days: dict[tuple[str, str, int], int] = {}
        # Per team, model, day and key label: a row's counts are the sum over its keys.
        self._ledger: dict[LedgerKey, list[int]] = {}
        # What each settlement added to the ledger since the ledger file's last write,
        # when one keeps it (limits/ledger_keeper.py): an append here, summed per row in
        # the file's thread (bench/ledger_file_cost.py).
        self._unwritten: list[Addition] | None = None
        self._done: OrderedDict[str, float] = OrderedDict()  # in settlement order

    def prepare(self, team: str, checks: tuple[Check, ...]) -> TeamChecks:
        return TeamChecks(team, checks)  # nothing to encode: the checks are used as they are

    async def admit(
        self, team_checks: TeamChecks, reserved: int, lease: str, lease_ttl: float
    ) -> Admission:
        team, checks = team_checks.team, team_checks.checks
        now = self._clock()
        day = int(now // DAY)
        levels = [self._level(team, check, now, day) for check in checks]
        for check, level in zip(checks, levels, strict=True):
            retry = wait_for(check, level, reserved, now)
            if retry is not None:
                states = tuple(
                    limit_state(c, v, 0, now) for c, v in zip(checks, levels, strict=True)
                )
                return Admission(False, day, states, refused=check, retry_after=retry)
        for check, level in zip(checks, levels, strict=True):
            self._take(team, check, level, reserved, lease, now + lease_ttl, now, day)
        states = tuple(
            limit_state(c, v, reserved, now) for c, v in zip(checks, levels, strict=True)
        )
        return Admission(True, day, states)

    def _level(self, team: str, check: Check, now: float, day: int) -> float:
        if check.kind == "concurrent":
            leases = self._leases.get((team, check.scope), {})
            for lease in [k for k, expiry in leases.items() if expiry <= now]:
                del leases[lease]
            return len(leases)
        if check.kind == "tokens_per_day":
            return self._days.get((team, check.scope, day), 0)
        return self._available(team, check, now)

    def _take(
        self,
        team: str,
        check: Check,
        level: float,
        reserved: int,
        lease: str,
        expiry: float,
        now: float,
        day: int,
    ) -> None:
        if check.kind == "concurrent":
            self._leases.setdefault((team, check.scope), {})[lease] = expiry
        elif check.kind == "tokens_per_day":
            self._days[(team, check.scope, day)] = int(level) + reserved
        else:
            need = 1 if check.kind == "requests_per_minute" else reserved
            self._buckets[(team, check.scope, check.kind)] = (level - need, now)

    def _available(self, team: str, check: Check, now: float) -> float:
        state = self._buckets.get((team, check.scope, check.kind))
        if state is None:
            return float(check.limit)
        tokens, last = state
        return min(float(check.limit), tokens + (now - last) * check.limit / PER_MINUTE)

    async def settle(self, s: Settlement) -> None:
        self.settle_now(s)

    def settle_now(self, s: Settlement) -> None:
        """``settle`` for a caller outside a coroutine: it does no I/O."""
        now = self._clock()
        self._forget_settled(now)
        if s.request_id in self._done:
            return
        self._done[s.request_id] = now + DONE_TTL
        delta = s.used - s.reserved
        for check in s.team_checks.checks:
            if check.kind == "concurrent":
                self._leases.get((s.team, check.scope), {}).pop(s.request_id, None)
            elif check.kind == "tokens_per_day":
                key = (s.team, check.scope, s.day)
                self._days[key] = self._days.get(key, 0) + delta
            elif check.kind == "tokens_per_minute":
                tokens = min(float(check.limit), self._available(s.team, check, now) - delta)
                self._buckets[(s.team, check.scope, check.kind)] = (tokens, now)
        row_key = (s.team, s.model, s.day, s.key)
        values = ledger_values(s)
        row = self._ledger.setdefault(row_key, [0] * len(LEDGER_FIELDS))
        for i, value in enumerate(values):
            row[i] += value
        if self._unwritten is not None:
            self._unwritten.append((row_key, values))

    def _forget_settled(self, now: float) -> None:
        done = self._done
        while done and (len(done) >= DONE_MAX or next(iter(done.values())) <= now):
            done.popitem(last=False)

    async def renew(self, team_checks: TeamChecks, lease: str, ttl: float) -> None:
        for check in team_checks.checks:
            leases = self._leases.get((team_checks.team, check.scope), {})
            if check.kind == "concurrent" and lease in leases:
                leases[lease] = self._clock() + ttl

    async def ledger(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]:
        return ledger_rows(
            (row, tuple(counts))
            for row, counts in sorted(self._ledger.items())
            if row[0] in teams and first_day <= row[2] <= last_day
        )

    def take_unwritten(self) -> list[Addition]:
        """What settlements added to the ledger since the last call (the first call
        starts the count): what the ledger file adds to its rows next."""
        unwritten, self._unwritten = self._unwritten or [], []
        return unwritten

    def unwritten_again(self, additions: Iterable[Addition]) -> None:
        """Additions a write did not take (summed per row, so that a file that refuses
        writes for long holds one per row): the next write adds them with the newer."""
        if self._unwritten is None:
            self._unwritten = []
        self._unwritten.extend(additions)

    def restore(self, rows: Mapping[LedgerKey, tuple[int, ...]]) -> None:
        """At start, the rows a ledger file kept: added to the ledger, and today's
        tokens to the tokens_per_day limits (team-wide and the model's)."""
        today = int(self._clock() // DAY)
        for (team, model, day, key), counts in rows.items():
            _add(self._ledger, (team, model, day, key), counts)
            if day == today:
                tokens = sum(counts[i] for i in TOKEN_FIELDS)
                for scope in ("*", model):
                    self._days[(team, scope, day)] = self._days.get((team, scope, day), 0) + tokens


def _add(rows: dict[LedgerKey, list[int]], key: LedgerKey, counts: Iterable[int]) -> None:
    row = rows.get(key)
    if row is None:
        rows[key] = list(counts)
    else:
        for i, value in enumerate(counts):
            row[i] += value


def ledger_values(s: Settlement) -> tuple[int, ...]:
    """In LEDGER_FIELDS order: reported and estimated tokens are kept apart."""
    if s.estimated:
        return (1, 0, 0, s.prompt_tokens, s.completion_tokens, s.cost)
    return (1, s.prompt_tokens, s.completion_tokens, 0, 0, s.cost)
