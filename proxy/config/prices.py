"""``price:`` on a provider (its targets' default) or a target, in USD per million tokens.

Read into whole micro-dollars per million tokens (``Price``): a price with more than six
decimals is refused rather than rounded, so what the ledger books is what the file says.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from proxy.config.fields import FieldReader
from proxy.config.model import Config, Price

PRICE_KEYS = {"input", "output", "cached_input"}
MICROS = 10**6
# Far above any model's price (a few hundred USD per million tokens), and low enough
# that a call's cost, at most 2 * (2**31 - 1) tokens at this price (4.3 * 10**14
# micro-dollars), leaves a day's ledger row thousands of such calls below Redis's
# 64-bit counters.
MAX_PRICE = 100_000


def read_price(reader: FieldReader, raw: Any, path: str) -> Price | None:
    """``{input, output, cached_input}``; ``cached_input`` defaults to ``input``."""
    if not isinstance(raw, dict):
        reader.mapping(raw, path)  # its error
        return None
    node = reader.mapping(raw, path, PRICE_KEYS)
    for required in ("input", "output"):
        if required not in node:
            reader.error(f"{path}.{required}", "is required (USD per million tokens)")
    fields = {k: _micros(reader, v, f"{path}.{k}") for k, v in node.items() if k in PRICE_KEYS}
    given = {k: v for k, v in fields.items() if v is not None}
    if len(given) != len(fields) or not {"input", "output"} <= set(given):
        return None
    return Price(given["input"], given["output"], given.get("cached_input", given["input"]))


def _micros(reader: FieldReader, raw: Any, path: str) -> int | None:
    """USD per million tokens → micro-dollars per million tokens, exactly."""
    return usd_micros(
        reader, raw, path, ("USD per million tokens", "a micro-dollar per million tokens"),
        MAX_PRICE,
    )  # fmt: skip


def usd_micros(
    reader: FieldReader, raw: Any, path: str, unit: tuple[str, str], maximum: int
) -> int | None:
    """An amount in USD → whole micro-dollars, exactly: more than six decimals is
    refused rather than rounded. ``unit``: what the amount is, and its smallest step, as
    the errors name them."""
    value = None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        # str: the number as written, not its binary double ('inf' and 'nan' parse too)
        value = Decimal(str(raw))
    if value is None or not value.is_finite() or not 0 <= value <= maximum:
        reader.error(path, f"must be {unit[0]}, 0 to {maximum}, got {raw!r}")
        return None
    micros = value * MICROS
    if micros != micros.to_integral_value():
        reader.error(path, f"at most 6 decimals ({unit[1]}), got {raw}")
        return None
    return int(micros)


def unpriced(config: Config) -> list[str]:
    """The targets without a price, whose calls cost 0: ``check`` warns about each, and
    names the teams with a budget that may call its model (they call it for free)."""
    warnings = []
    for model in config.models.values():
        free_to = _budgeted(config, model.id)
        for i, target in enumerate(model.targets):
            if target.price is not None:
                continue
            warning = (
                f"models.{model.id}.targets[{i}]: no price (on the target or provider "
                f"'{target.provider}'): its calls cost 0"
            )
            if free_to:
                warning += f", so they spend nothing of the budgets of {', '.join(free_to)}"
            warnings.append(warning)
    return warnings


def _budgeted(config: Config, model: str) -> list[str]:
    """The teams that may call ``model`` and have a budget it would spend."""
    return [
        team.name
        for team in config.teams.values()
        if (team.models is None or model in team.models)
        and (team.budget or team.model_budgets.get(model))
    ]
