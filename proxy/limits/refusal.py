"""What a refused admission answers: 429 ``rate_limit_exceeded`` for a rate limit, 429
``insufficient_quota`` for a spent budget, each naming the limit and when it resets."""

from __future__ import annotations

import datetime as dt

from proxy.errors import QuotaExceeded, RateLimited, retry_seconds
from proxy.limits.rate_headers import describe_refusal, duration_text, rate_headers
from proxy.limits.store import BUDGETS, DAY, Admission, Check, period_end

PERIODS = {"daily_usd": "daily", "monthly_usd": "monthly"}


def refusal(admission: Admission, reserved: int, cost: int) -> RateLimited:
    """The error for a refused ``admission`` of a call reserving ``reserved`` tokens and
    ``cost`` micro-dollars."""
    check = admission.refused
    assert check is not None
    if check.kind in BUDGETS:
        return _budget_refusal(admission, check, cost)
    return RateLimited(
        describe_refusal(check, reserved, admission.retry_after),
        retry_after=admission.retry_after,
        param=check.kind,
        headers=rate_headers(admission),
    )


def _budget_refusal(admission: Admission, check: Check, cost: int) -> QuotaExceeded:
    reset_text = resets_at(check.kind, admission.day)
    left = next((s.remaining for s in admission.states if s.check == check), 0)
    scope = "" if check.scope == "*" else f" for model '{check.scope}'"
    budget = f"{PERIODS[check.kind]} budget of {usd(check.limit)} USD{scope}"
    if cost > check.limit:
        why = f"more than the team's whole {budget}. Lower max_tokens."
    else:
        why = f"more than what is left of the team's {budget}: {usd(left)} USD."
    wait = duration_text(retry_seconds(admission.retry_after))
    message = (
        f"Budget exceeded: this request may cost up to {usd(cost)} USD (its prompt estimate "
        f"at its targets' highest input price, and max_tokens x n at their highest output "
        f"price), {why} The budget resets at {reset_text} (in {wait})."
    )
    headers = {
        **rate_headers(admission),
        "x-budget-limit-usd": usd(check.limit),
        "x-budget-remaining-usd": usd(left),
        "x-budget-reset": reset_text,
    }
    return QuotaExceeded(
        message, retry_after=admission.retry_after, param=check.kind, headers=headers
    )


def resets_at(kind: str, day: int) -> str:
    """When the day or month of a budget counted on ``day`` ends, in ISO 8601 UTC: by
    the admission's UTC day, the same instant on every replica."""
    resets = dt.datetime.fromtimestamp(period_end(kind, day * DAY), dt.UTC)
    return resets.strftime("%Y-%m-%dT%H:%M:%SZ")


def usd(micros: int) -> str:
    """Micro-dollars as a USD amount, exactly: 1.5, 0.000001."""
    whole, rest = divmod(micros, 1_000_000)
    return f"{whole}.{rest:06d}".rstrip("0").rstrip(".") if rest else str(whole)
