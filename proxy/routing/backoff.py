"""How long to wait before the next attempt: the upstream's Retry-After, or full jitter."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from proxy.config.model import RetryPolicy


def backoff_delay(
    policy: RetryPolicy, retry_number: int, rng: Callable[[], float] = random.random
) -> float:
    """Full jitter (AWS's name): uniform in [0, min(cap, base * 2^(n-1))] for retry n ≥ 1."""
    ceiling = min(policy.max_delay, policy.base_delay * 2.0 ** (retry_number - 1))
    return rng() * ceiling


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (RFC 9110 §10.2.3: delta-seconds or an HTTP date), or None
    when it is neither: an upstream's header must never fail the call, so anything
    unparseable is ignored and full-jitter backoff applies. A huge value is honoured
    as such (inf, beyond any ``max_retry_after``: the next target, at once)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²" or "٣": str.isdigit takes those
        return float(value)  # inf for hundreds of digits, which compares as it should
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
