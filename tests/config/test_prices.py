"""``price:`` in routes.yaml: read as whole micro-dollars per million tokens, the
provider's price the default of its targets, bad prices refused with their path, and
``check`` naming every target that has none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.load import ConfigError, parse_config
from proxy.config.model import Price
from tests.support import ROOT

PRICED = """
providers:
  cloud:
    base_url: https://cloud.example/v1
    price: {input: 2.5, output: 10, cached_input: 1.25}
  local:
    base_url: http://127.0.0.1:8081/v1
models:
  big:
    targets:
      - {provider: cloud, model: big-1}
      - {provider: cloud, model: big-2, price: {input: 0.15, output: 0.6}}
      - {provider: local, model: big-3, price: {input: 0, output: 0}}
      - {provider: local, model: big-4, price: {input: 0.000001, output: 100000}}
  small:
    targets:
      - {provider: local, model: small-1}
"""


def test_prices_are_micro_dollars_per_million_tokens_with_the_provider_s_as_default():
    targets = parse_config(PRICED, {}).models["big"].targets
    assert [t.price for t in targets] == [
        Price(input=2_500_000, output=10_000_000, cached_input=1_250_000),
        Price(input=150_000, output=600_000, cached_input=150_000),  # cached: as input
        Price(input=0, output=0, cached_input=0),  # free on purpose: no warning
        Price(input=1, output=100_000_000_000, cached_input=1),  # the bounds
    ]
    assert parse_config(PRICED, {}).models["small"].targets[0].price is None


@pytest.mark.parametrize(
    ("price", "error"),
    [
        (
            "{input: -1, output: 1}",
            "models.small.targets[0].price.input: must be USD per million tokens, 0 to 100000, "
            "got -1",
        ),
        (
            "{input: 1, output: 0.0000001}",
            "models.small.targets[0].price.output: at most 6 decimals (a micro-dollar per "
            "million tokens), got 1e-07",
        ),
        (
            "{input: '1', output: 1}",
            "models.small.targets[0].price.input: must be USD per million tokens, 0 to 100000, "
            "got '1'",
        ),
        (
            "{input: 1, output: .inf}",
            "models.small.targets[0].price.output: must be USD per million tokens, 0 to 100000, "
            "got inf",
        ),
        (
            "{input: 1}",
            "models.small.targets[0].price.output: is required (USD per million tokens)",
        ),
        (
            "{input: 1, output: 2, cached: 1}",
            "models.small.targets[0].price.cached: unknown key (did you mean 'cached_input'?)",
        ),
        ("3", "models.small.targets[0].price: must be a mapping, got int"),
    ],
)
def test_a_price_that_cannot_be_is_refused_with_its_path(price: str, error: str):
    text = PRICED.replace(
        "{provider: local, model: small-1}", f"{{provider: local, model: small-1, price: {price}}}"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    assert caught.value.errors == [error]


def _check(path: Path) -> list[str]:
    """``python -m proxy check``'s lines for ``path``, which it must pass."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def test_check_warns_about_each_target_without_a_price(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(PRICED + "  other:\n    targets: [{provider: local, model: o}]\n")
    lines = _check(path)
    assert lines == [
        "warning: models.small.targets[0]: no price (on the target or provider 'local'): "
        "its calls cost 0",
        "warning: models.other.targets[0]: no price (on the target or provider 'local'): "
        "its calls cost 0",
        f"{path}: OK (2 providers, 3 models)",
    ]


def test_check_names_the_budgeted_teams_that_call_an_unpriced_model_for_free(tmp_path: Path):
    """A budget holds nothing for a call that costs 0: the warning says whose budgets
    the unpriced target escapes (a team allowed the model, with a budget of its own or
    one for that model), and leaves out teams without a budget or without the model."""
    a, b, c = ("sha256:" + letter * 64 for letter in "abc")
    teams = f"""
teams:
  research: {{keys: ["{a}"], budget: {{daily_usd: 5}}}}
  ops: {{keys: ["{b}"], models: [big], model_budgets: {{big: {{monthly_usd: 9}}}}}}
  free: {{keys: ["{c}"]}}
"""
    path = tmp_path / "routes.yaml"
    path.write_text(PRICED + teams)
    lines = _check(path)
    assert lines[0] == (
        "warning: models.small.targets[0]: no price (on the target or provider 'local'): "
        "its calls cost 0, so they spend nothing of the budgets of research"
    )
