"""What a call costs, in whole micro-dollars (USD times 10⁶).

Prices are whole micro-dollars per million tokens (config/prices.py), so a call's exact
cost is ``(uncached prompt * input + cached * cached_input + completion * output)``
divided by 10⁶. It is rounded once per call, half to even: unbiased, so over many calls
the ledger's total drifts from the exact one by no more than chance would, and the
ledger adds integers, so its sums are exact sums of the calls' costs.
"""

from __future__ import annotations

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
