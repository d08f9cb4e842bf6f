"""The limiter and ledger in this process: the embedded default, and the fail-open
fallback when Redis is down. Same semantics as the Lua scripts in limits/lua.py, with
the shared arithmetic of store.py (``wait_for``, ``limit_state``)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from proxy.limits.store import (
    BUDGETS,
    COST,
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
    amount,
    ledger_rows,
    limit_state,
    month_of,
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
        # Budgets: what a team spent is read off its ledger rows (cost_micro_usd), so a
        # ledger restored at start restores it; what calls in flight hold is kept apart,
        # per (team, scope, day or month). The rows' costs are indexed per (team, budget
        # kind, day or month) and model ("*": all), rebuilt from the ledger whenever
        # rows were added to it by other means than a settlement (a restore).
        self._holds: dict[tuple[str, str, int], int] = {}
        self._costs: dict[tuple[str, str, int], dict[str, int]] = {}
        self._indexed = 0  # ledger rows the cost index has seen

    def prepare(self, team: str, checks: tuple[Check, ...]) -> TeamChecks:
        return TeamChecks(team, checks)  # nothing to encode: the checks are used as they are

    async def admit(
        self, team_checks: TeamChecks, reserved: int, lease: str, lease_ttl: float, cost: int = 0
    ) -> Admission:
        team, checks = team_checks.team, team_checks.checks
        now = self._clock()
        day = int(now // DAY)
        levels = [self._level(team, check, now, day) for check in checks]
        takings = [amount(check, reserved, cost) for check in checks]
        for check, level, taking in zip(checks, levels, takings, strict=True):
            retry = wait_for(check, level, taking, now)
            if retry is not None:
                states = tuple(
                    limit_state(c, v, 0, now) for c, v in zip(checks, levels, strict=True)
                )
                return Admission(False, day, states, refused=check, retry_after=retry)
        for check, level, taking in zip(checks, levels, takings, strict=True):
            self._take(team, check, level, taking, lease, now + lease_ttl, now, day)
        states = tuple(
            limit_state(c, v, taking, now)
            for c, v, taking in zip(checks, levels, takings, strict=True)
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
        if check.kind in BUDGETS:
            held = self._holds.get((team, check.scope, _period(check.kind, day)), 0)
            return self._spent(team, check, day) + held
        return self._available(team, check, now)

    def _spent(self, team: str, check: Check, day: int) -> int:
        """What the ledger books for ``check``'s scope, today or this month."""
        if self._indexed != len(self._ledger):
            self._index_costs()
        return self._costs.get((team, check.kind, _period(check.kind, day)), {}).get(check.scope, 0)

    def _index_costs(self) -> None:
        self._costs = {}
        for (team, model, day, _), counts in self._ledger.items():
            self._add_cost(team, model, day, counts[COST])
        self._indexed = len(self._ledger)

    def _add_cost(self, team: str, model: str, day: int, cost: int) -> None:
        """A row's cost in the index: its day's and its month's, its model's and the
        team's ("*")."""
        for kind in BUDGETS:
            costs = self._costs.setdefault((team, kind, _period(kind, day)), {})
            costs[model] = costs.get(model, 0) + cost
            costs["*"] = costs.get("*", 0) + cost

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
        elif check.kind in BUDGETS:
            key = (team, check.scope, _period(check.kind, day))
            self._holds[key] = self._holds.get(key, 0) + reserved
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
            elif check.kind in BUDGETS:  # the call's cost is in its ledger row, below
                hold = (s.team, check.scope, _period(check.kind, s.day))
                if (left := self._holds.get(hold, 0) - s.reserved_cost) > 0:
                    self._holds[hold] = left
                else:
                    self._holds.pop(hold, None)
        self._book(s)

    def _book(self, s: Settlement) -> None:
        """The settlement's ledger row, and its cost in the index of costs."""
        indexed = self._indexed == len(self._ledger)
        row_key = (s.team, s.model, s.day, s.key)
        values = ledger_values(s)
        _add(self._ledger, row_key, values)
        if self._unwritten is not None:
            self._unwritten.append((row_key, values))
        if indexed:  # else the index is rebuilt when next read
            self._add_cost(s.team, s.model, s.day, s.cost)
            self._indexed = len(self._ledger)

    def _forget_settled(self, now: float) -> None:
        done = self._done
        while done and (len(done) >= DONE_MAX or next(iter(done.values())) <= now):
            done.popitem(last=False)

    async def renew(self, team_checks: TeamChecks, lease: str, ttl: float) -> None:
        for check in team_checks.checks:
            leases = self._leases.get((team_checks.team, check.scope), {})
            if check.kind == "concurrent" and lease in leases:
                leases[lease] = self._clock() + ttl

    async def levels(self, team: str, checks: tuple[Check, ...]) -> tuple[int, list[int]]:
        """The UTC day, and what each per-period check of ``team`` holds now (budgets:
        micro-dollars spent and held by calls in flight)."""
        now = self._clock()
        day = int(now // DAY)
        return day, [int(self._level(team, check, now, day)) for check in checks]

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
        self._indexed = -1  # the budgets' costs are read again from the rows


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


def _period(kind: str, day: int) -> int:
    """The day, or for a monthly budget the month, whose holds a call's budget joins."""
    return month_of(day) if kind == "monthly_usd" else day
