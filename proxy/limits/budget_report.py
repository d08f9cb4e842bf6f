"""What GET /v1/usage says of a team's budgets, and the gauges that show them."""

from __future__ import annotations

from typing import Any

from proxy.limits.ledger import usd_number
from proxy.limits.refusal import PERIODS, resets_at
from proxy.limits.store import BUDGETS, Admission, Check
from proxy.observe.metrics import Metrics


def budget_rows(checks: tuple[Check, ...], day: int, levels: list[int]) -> list[dict[str, Any]]:
    """Per budget: its model (None: the whole team's), period, limit, what is used
    (spent, and held by calls in flight) and left, in micro-dollars and in USD, and
    when it starts again (UTC)."""
    rows = []
    for check, used in zip(checks, levels, strict=True):
        left = max(0, check.limit - used)
        rows.append(
            {
                "model": None if check.scope == "*" else check.scope,
                "period": PERIODS[check.kind],
                "limit_micro_usd": check.limit,
                "used_micro_usd": used,
                "remaining_micro_usd": left,
                "limit_usd": usd_number(check.limit),
                "used_usd": usd_number(used),
                "remaining_usd": usd_number(left),
                "resets_at": resets_at(check.kind, day),
            }
        )
    return rows


def show_budgets(metrics: Metrics, team: str, admission: Admission) -> None:
    """The budgets an admission saw: their limits and what they hold after it, as
    gauges (llm_proxy_budget_usd, llm_proxy_budget_used_usd)."""
    for state in admission.states:
        check = state.check
        if check.kind in BUDGETS:
            metrics.budget(team, check.scope, PERIODS[check.kind], check.limit,
                           check.limit - state.remaining)  # fmt: skip
