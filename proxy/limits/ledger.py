"""The ledger as the usage endpoint and ``python -m proxy usage`` show it."""

from __future__ import annotations

import datetime as dt
from typing import Any

from proxy.errors import InvalidRequest
from proxy.limits.store import DAY, LEDGER_FIELDS, LedgerRow


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
    data = [
        {
            "team": r.team,
            "model": r.model,
            "date": _date(r.day),
            **dict(zip(LEDGER_FIELDS, r.counts, strict=True)),
        }
        for r in rows
    ]
    totals = {field: sum(r.counts[i] for r in rows) for i, field in enumerate(LEDGER_FIELDS)}
    return {
        "object": "list",
        "from": _date(first),
        "to": _date(last),
        "data": data,
        "totals": totals,
    }


def _date(day: int) -> str:
    return dt.datetime.fromtimestamp(day * DAY, dt.UTC).date().isoformat()
