"""``budget:`` and ``model_budgets:`` of a team: the most its calls may cost a UTC day or
a UTC month, in USD, read into whole micro-dollars (``Budget``) as prices are."""

from __future__ import annotations

from typing import Any

from proxy.config.fields import FieldReader
from proxy.config.model import BUDGET_KINDS, Budget
from proxy.config.prices import usd_micros

# A billion USD: far above any budget, and far below Redis's 64-bit counters however
# many reservations a period holds.
MAX_BUDGET = 10**9


def read_budget(reader: FieldReader, raw: Any, path: str) -> Budget:
    """``{daily_usd, monthly_usd}``, either or both; absent: no budget."""
    if raw is None:
        return Budget()
    node = reader.mapping(raw, path, set(BUDGET_KINDS))
    amounts = {
        kind: usd_micros(reader, node[kind], f"{path}.{kind}", ("USD", "a micro-dollar"),
                         MAX_BUDGET)
        for kind in BUDGET_KINDS
        if kind in node
    }  # fmt: skip
    return Budget(**{kind: value for kind, value in amounts.items() if value is not None})
