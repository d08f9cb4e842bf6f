"""``budget:`` and ``model_budgets:`` of a team in routes.yaml: USD read as whole
micro-dollars, each bad value refused with its YAML path."""

from __future__ import annotations

import pytest

from proxy.config.load import ConfigError, parse_config
from proxy.config.model import Budget
from proxy.limits.memory import MemoryStore
from proxy.limits.plan import LimitPlan
from proxy.limits.store import Check

BUDGETED = """
providers:
  local:
    base_url: http://127.0.0.1:8081/v1
    price: {input: 1, output: 2}
models:
  big: {targets: [{provider: local, model: big-1}]}
  small: {targets: [{provider: local, model: small-1}]}
teams:
  research:
    keys: ["sha256:KEY_A"]
    limits: {requests_per_minute: 10}
    budget: {daily_usd: 12.5, monthly_usd: 300}
    model_budgets:
      big: {daily_usd: 0.000001}
  ops:
    keys: ["sha256:KEY_B"]
""".replace("KEY_A", "a" * 64).replace("KEY_B", "b" * 64)


def test_budgets_are_micro_dollars_and_become_the_team_s_checks():
    config = parse_config(BUDGETED, {})
    research = config.teams["research"]
    assert research.budget == Budget(daily_usd=12_500_000, monthly_usd=300_000_000)
    assert dict(research.model_budgets) == {"big": Budget(daily_usd=1)}
    assert not config.teams["ops"].budget and not config.teams["ops"].model_budgets
    plan = LimitPlan(config, MemoryStore())
    team_wide = (
        Check("*", "requests_per_minute", 10),
        Check("*", "daily_usd", 12_500_000),
        Check("*", "monthly_usd", 300_000_000),
    )
    assert plan.checks("research", "small").checks == team_wide
    assert plan.checks("research", "big").checks == (*team_wide, Check("big", "daily_usd", 1))
    assert plan.budgets("research") == (*team_wide[1:], Check("big", "daily_usd", 1))
    assert plan.budgets("ops") == ()


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        (
            "daily_usd: 12.5,",
            "daily_usd: -1,",
            "teams.research.budget.daily_usd: must be USD, 0 to 1000000000, got -1",
        ),
        (
            "monthly_usd: 300",
            "monthly_usd: 0.0000001",
            "teams.research.budget.monthly_usd: at most 6 decimals (a micro-dollar), got 1e-07",
        ),
        (
            "monthly_usd: 300",
            "weekly_usd: 300",
            "teams.research.budget.weekly_usd: unknown key (did you mean 'daily_usd'?)",
        ),
        (
            "big: {daily_usd: 0.000001}",
            "bigger: {daily_usd: 1}",
            "teams.research.model_budgets.bigger: unknown model (did you mean 'big'?)",
        ),
        (
            "big: {daily_usd: 0.000001}",
            "big: {daily_usd: '1'}",
            "teams.research.model_budgets.big.daily_usd: must be USD, 0 to 1000000000, got '1'",
        ),
        (
            "budget: {daily_usd: 12.5, monthly_usd: 300}",
            "budget: 12.5",
            "teams.research.budget: must be a mapping, got float",
        ),
    ],
)
def test_a_budget_that_cannot_be_is_refused_with_its_path(old: str, new: str, error: str):
    with pytest.raises(ConfigError) as caught:
        parse_config(BUDGETED.replace(old, new), {})
    assert caught.value.errors == [error]


def test_a_model_budget_must_be_one_of_the_team_s_models():
    text = BUDGETED.replace("    budget:", "    models: [small]\n    budget:")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert caught.value.errors == [
        "teams.research.model_budgets.big: not one of teams.research.models"
    ]
