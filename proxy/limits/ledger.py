"""The ledger as the usage endpoint and ``python -m proxy usage`` show it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from proxy.errors import InvalidRequest
from proxy.limits.store import COST, DAY, LEDGER_FIELDS, LedgerRow, summed


def day_range(first: str | None, last: str | None) -> tuple[int, int]:
    """Days since the epoch for ``from`` and ``to`` (inclusive, UTC); both default to today."""
    today = dt.datetime.now(dt.UTC).date()
    return _day(first, today, "from"), _day(last, today, "to")


def _day(text: str | None, default: dt.date, param: str) -> int:
    try:
        date = dt.date.fromisoformat(text) if text else default
    except ValueError:
        raise InvalidRequest(f"'{param}' must be a date as YYYY-MM-DD.", param=param) from None
    return (date - dt.date(1970, 1, 1)).days


def ledger_report(rows: list[LedgerRow], first: int, last: int) -> dict[str, Any]:
    """Each row and the totals: the counts, ``cost_usd``, and ``keys``, the same split
    by the label of the key that called."""
    data = [
        {
            "team": r.team,
            "model": r.model,
            "date": _date(r.day),
            **_counts(r.counts),
            "keys": {label: _counts(counts) for label, counts in r.keys},
        }
        for r in rows
    ]
    by_key: dict[str, list[tuple[int, ...]]] = {}
    for row in rows:
        for label, counts in row.keys:
            by_key.setdefault(label, []).append(counts)
    totals = {
        **_counts(summed(r.counts for r in rows)),
        "keys": {label: _counts(summed(counts)) for label, counts in sorted(by_key.items())},
    }
    return {
        "object": "list",
        "from": _date(first),
        "to": _date(last),
        "data": data,
        "totals": totals,
    }


def _counts(counts: tuple[int, ...]) -> dict[str, Any]:
    """The counts by name, and the cost in USD beside its exact micro-dollars."""
    named: dict[str, Any] = dict(zip(LEDGER_FIELDS, counts, strict=True))
    named["cost_usd"] = usd_number(counts[COST])
    return named


def usd_number(micros: int) -> float:
    """Micro-dollars as USD, as JSON prints them: shown exactly up to 10**15 micro-dollars
    (a billion USD; a double holds 15 significant digits). ``cost_micro_usd`` is exact."""
    return micros / 1_000_000


def _date(day: int) -> str:
    return dt.datetime.fromtimestamp(day * DAY, dt.UTC).date().isoformat()
