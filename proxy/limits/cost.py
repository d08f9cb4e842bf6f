"""What a call costs, in whole micro-dollars (USD times 10⁶).

Prices are whole micro-dollars per million tokens (config/prices.py), so a call's exact
cost is ``(uncached prompt * input + cached * cached_input + completion * output)``
divided by 10⁶. It is rounded once per call, half to even: unbiased, so over many calls
the ledger's total drifts from the exact one by no more than chance would, and the
ledger adds integers, so its sums are exact sums of the calls' costs.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.config.model import Price
from proxy.limits.usage import Usage

PER_MILLION = 10**6


def cost_micros(usage: Usage, price: Price | None) -> int:
    """The cost of ``usage`` at ``price``; 0 without a price."""
    if price is None:
        return 0
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    exact = (
        (usage.prompt_tokens - cached) * price.input
        + cached * price.cached_input
        + usage.completion_tokens * price.output
    )
    whole, rest = divmod(exact, PER_MILLION)
    if 2 * rest > PER_MILLION or (2 * rest == PER_MILLION and whole % 2):
        whole += 1
    return whole


def worst_case(prompt: int, reserved: int, prices: Iterable[Price | None]) -> int:
    """What a budget holds for a call reserving ``reserved`` tokens, ``prompt`` of them
    its prompt estimate and the rest what it may generate (max_tokens x n): the prompt
    at the highest input price among the targets that may serve it, the rest at the
    highest output price, rounded up. A target without a price costs 0."""
    given = [p for p in prices if p is not None]
    if not given:
        return 0
    most_in = max(max(p.input, p.cached_input) for p in given)
    most_out = max(p.output for p in given)
    return -(-(prompt * most_in + (reserved - prompt) * most_out) // PER_MILLION)
