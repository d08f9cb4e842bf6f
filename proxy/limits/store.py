"""What the limiter and ledger store: the shapes shared by the Redis and memory backends.

Both backends implement the same two calls with the same semantics, so the code above
them does not know which one runs:

- ``admit``: check every limit of a call and take them all, or none (one round trip).
- ``settle``: correct the token reservation with the real usage, free the concurrency
  slot and add the usage to the ledger; idempotent per request id, so a settlement that
  is retried after an error is counted once (one round trip).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Protocol

# Kind codes shared with the Lua scripts.
KIND_CODES = {"requests_per_minute": 1, "tokens_per_minute": 2, "concurrent": 3,
              "tokens_per_day": 4, "daily_usd": 5, "monthly_usd": 6}  # fmt: skip
# Budgets: checks in micro-dollars (the call's worst-case cost), per UTC day or month.
BUDGETS = ("daily_usd", "monthly_usd")
PER_MINUTE = 60.0
LEDGER_FIELDS = (
    "requests", "prompt_tokens", "completion_tokens", "estimated_prompt_tokens",
    "estimated_completion_tokens", "cost_micro_usd",
)  # fmt: skip
COST = LEDGER_FIELDS.index("cost_micro_usd")
NO_KEY = "-"  # the key label of calls without a key (no team configured)


class StoreUnavailable(Exception):
    """The backend could not be reached; the caller decides between fail open and closed."""


class Unconfirmed(StoreUnavailable):
    """A settlement the primary applied but fewer replicas than ``ledger_replicas``
    confirmed: the limits are corrected; the ledger write is sent again (it counts once)
    until they do."""


@dataclass(frozen=True)
class Check:
    """One limit a call must pass: ``scope`` is "*" (the whole team) or a model id."""

    scope: str
    kind: str
    limit: int


@dataclass(frozen=True)
class TeamChecks:
    """A team's checks for one model, with what the store makes of them once: made by
    ``Store.prepare`` when a config is loaded (limits/plan.py), so a call encodes only
    what is its own. ``encoded`` is the store's own (RedisStore: the scripts' keys and
    arguments; MemoryStore: nothing)."""

    team: str
    checks: tuple[Check, ...]
    encoded: object = None


@dataclass(frozen=True)
class LimitState:
    """After admission (or refusal): what the x-ratelimit-* headers report for a check."""

    check: Check
    remaining: int
    reset: float  # seconds until the limit is whole again


@dataclass(frozen=True)
class Admission:
    admitted: bool
    day: int  # days since the epoch on the store's clock, for the ledger and tokens_per_day
    states: tuple[LimitState, ...] = ()
    refused: Check | None = None
    retry_after: float = 0.0


@dataclass(frozen=True)
class Settlement:
    request_id: str
    team_checks: TeamChecks  # what admission took here; no checks for ledger-only
    model: str
    day: int
    reserved: int
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    cost: int = 0  # micro-dollars (limits/cost.py)
    key: str = NO_KEY  # the name of the key that called (config: TeamKey.name)
    reserved_cost: int = 0  # micro-dollars the budgets held at admission

    @property
    def team(self) -> str:
        return self.team_checks.team

    @property
    def used(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def described(self) -> dict[str, object]:
        """What a log line says of it (the store's encoding is not for people)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "team_checks"}
        return {"team": self.team, **own}


@dataclass(frozen=True)
class LedgerRow:
    team: str
    model: str
    day: int
    counts: tuple[int, ...]  # in LEDGER_FIELDS order
    keys: tuple[tuple[str, tuple[int, ...]], ...] = ()  # the counts split by key label


LedgerKey = tuple[str, str, int, str]  # team, model, day (since the epoch), key label
Addition = tuple[LedgerKey, tuple[int, ...]]  # counts added to a ledger row, or a row's counts


def totals(additions: Iterable[Addition]) -> dict[LedgerKey, tuple[int, ...]]:
    """The additions summed per row."""
    rows: dict[LedgerKey, tuple[int, ...]] = {}
    for key, counts in additions:
        row = rows.get(key)
        rows[key] = counts if row is None else tuple(map(sum, zip(row, counts, strict=True)))
    return rows


def ledger_rows(split: Iterable[Addition]) -> list[LedgerRow]:
    """Counts per team, model, day and key label (sorted) as rows with their key split."""
    rows: dict[tuple[str, str, int], list[tuple[str, tuple[int, ...]]]] = {}
    for (team, model, day, key), counts in split:
        rows.setdefault((team, model, day), []).append((key, counts))
    return [
        LedgerRow(team, model, day, summed(c for _, c in keys), tuple(keys))
        for (team, model, day), keys in rows.items()
    ]


def summed(counts: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    """Ledger counts (LEDGER_FIELDS order) added up field by field."""
    return tuple(map(sum, zip(*counts, strict=True))) or (0,) * len(LEDGER_FIELDS)


class Store(Protocol):
    def prepare(self, team: str, checks: tuple[Check, ...]) -> TeamChecks: ...

    async def admit(
        self, team_checks: TeamChecks, reserved: int, lease: str, lease_ttl: float, cost: int = 0
    ) -> Admission: ...

    async def settle(self, settlement: Settlement) -> None: ...

    async def renew(self, team_checks: TeamChecks, lease: str, ttl: float) -> None: ...

    async def ledger(self, teams: list[str], first_day: int, last_day: int) -> list[LedgerRow]: ...

    async def levels(self, team: str, checks: tuple[Check, ...]) -> tuple[int, list[int]]: ...


DAY = 86400.0


@functools.lru_cache(maxsize=64)  # a pure function of a day: today's, asked per call
def month_of(day: int) -> int:
    """The UTC calendar month of a day since the epoch, as months since year 0 (year * 12
    + month - 1): what a monthly budget is counted by. lua.py's ``month_of`` is the same."""
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    return date.year * 12 + date.month - 1


def period_end(kind: str, now: float) -> float:
    """When the period of a per-day or per-month check that ``now`` falls in ends (UTC)."""
    day = int(now // DAY)
    if kind != "monthly_usd":
        return (day + 1) * DAY
    year, month = divmod(month_of(day) + 1, 12)
    return (dt.date(year, month + 1, 1) - dt.date(1970, 1, 1)).days * DAY


def amount(check: Check, reserved: int, cost: int) -> int:
    """What a call takes of ``check``: micro-dollars of a budget, else tokens."""
    return cost if check.kind in BUDGETS else reserved


def wait_for(check: Check, level: float, reserved: int, now: float) -> float | None:
    """Seconds until ``check`` could admit a call reserving ``reserved`` tokens (or
    micro-dollars, for a budget), given its current level (bucket tokens, live leases, or
    what today or this month holds); None if it can now. The Lua admission script
    computes the same."""
    if check.kind == "concurrent":
        return 1.0 if level >= check.limit else None
    if check.kind == "tokens_per_day" or check.kind in BUDGETS:
        fits = reserved <= check.limit and level + reserved <= check.limit
        return None if fits else period_end(check.kind, now) - now
    need = 1 if check.kind == "requests_per_minute" else reserved
    if need > check.limit:
        return PER_MINUTE  # can never fit; the refusal's message says why
    return None if level >= need else (need - level) / (check.limit / PER_MINUTE)


def limit_state(check: Check, level: float, taking: int, now: float) -> LimitState:
    """The x-ratelimit-* view of a check after taking ``taking`` tokens (0: refused)."""
    if check.kind == "concurrent":
        return LimitState(check, max(0, check.limit - int(level) - (1 if taking else 0)), 0.0)
    if check.kind == "tokens_per_day" or check.kind in BUDGETS:
        used = int(level) + taking
        return LimitState(check, max(0, check.limit - used), period_end(check.kind, now) - now)
    need = (1 if taking else 0) if check.kind == "requests_per_minute" else taking
    left = level - need
    reset = (check.limit - left) / (check.limit / PER_MINUTE)
    return LimitState(check, max(0, math.floor(left)), max(0.0, reset))
