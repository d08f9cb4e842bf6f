"""``python -m proxy usage``: the ledger of a running proxy, as a table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from proxy.limits.store import LEDGER_FIELDS

_COUNTS = tuple(f for f in LEDGER_FIELDS if f != "cost_micro_usd")
_COLUMNS = ("date", "team", "model", *_COUNTS, "cost_usd")
_BY_KEY = ("date", "team", "model", "key", *_COUNTS, "cost_usd")
_BUDGET_COLUMNS = ("team", "model", "period", "limit_usd", "used_usd", "remaining_usd",
                   "resets_at")  # fmt: skip
ADMIN_KEY_ENV = "PROXY_ADMIN_KEY"
_KEY_HINT = (
    f"the ledger needs routes.yaml's admin_key: pass it with --admin-key KEY or {ADMIN_KEY_ENV}=KEY"
)


def _said(exc: urllib.error.HTTPError) -> str:
    """The error's message from the proxy's OpenAI-shaped body, else the body."""
    body = exc.read().decode(errors="replace")
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body


def show_usage(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("team", args.team), ("from", args.first), ("to", args.last)) if v}
    url = f"{args.url.rstrip('/')}/v1/usage?{urllib.parse.urlencode(query)}"
    key = args.admin_key if args.admin_key is not None else os.environ.get(ADMIN_KEY_ENV, "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            report = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {_said(exc)}", file=sys.stderr)
        if exc.code in (401, 403):
            print(_KEY_HINT, file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        where = f"cannot reach the proxy at {args.url}: {reason} (--url says where it runs)"
        print(where, file=sys.stderr)
        return 1
    print(_by_key(report) if args.by_key else _table(report))
    if budgets := _budgets(report):
        print("\n" + budgets)
    return 0


def _table(report: dict[str, Any]) -> str:
    return _aligned(_COLUMNS, [_cells(row, row) for row in _rows(report)])


def _by_key(report: dict[str, Any]) -> str:
    """One line per row and label of a key that called."""
    lines = []
    for row in _rows(report):
        for label, counts in row["keys"].items():
            cells = _cells(row, counts)
            lines.append([*cells[:3], label, *cells[3:]])
    return _aligned(_BY_KEY, lines)


def _budgets(report: dict[str, Any]) -> str:
    """What is left of each budget, if the teams shown have any ("" if not)."""
    rows = [
        [team, budget["model"] or "*", budget["period"],
         *(_usd(budget[f"{f}_micro_usd"]) for f in ("limit", "used", "remaining")),
         budget["resets_at"]]
        for team, budgets in report.get("budgets", {}).items()
        for budget in budgets
    ]  # fmt: skip
    return _aligned(_BUDGET_COLUMNS, rows) if rows else ""


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's rows, then its totals as a row dated "total"."""
    return [*report["data"], {"date": "total", **report["totals"]}]


def _cells(row: dict[str, Any], counts: dict[str, Any]) -> list[str]:
    """Date, team, model, the counts, and the cost from its exact micro-dollars."""
    return [
        *(str(row.get(c, "")) for c in ("date", "team", "model")),
        *(str(counts[f]) for f in _COUNTS),
        _usd(counts["cost_micro_usd"]),
    ]


def _usd(micros: int) -> str:
    whole, rest = divmod(micros, 1_000_000)
    return f"{whole}.{rest:06d}"


def _aligned(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
