"""The order in which a call tries a provider's endpoints, or a model's targets.

Strategies: ``round_robin`` rotates; ``weighted`` draws an order at random in
proportion to weights; ``least_busy`` puts the replica with the fewest calls in
flight (in this process) first; ``affinity`` sends the same conversation prefix to
the same replica (rendezvous hashing, so removing one replica moves only its own
conversations), which lets an engine reuse its prefix cache. ``fallback`` keeps the
configured order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Balancer:
    """Round-robin counters and in-flight counts; kept on the app across reloads."""

    def __init__(self, rng: Callable[[], float] = random.random):
        self._rng = rng
        self._turns: dict[str, itertools.count[int]] = defaultdict(itertools.count)
        self.in_flight: dict[str, int] = defaultdict(int)

    def order(
        self,
        group: str,
        items: Sequence[T],
        strategy: str,
        key_of: Callable[[T], str],
        weight_of: Callable[[T], float],
        affinity: str | None = None,
    ) -> list[T]:
        if len(items) < 2 or strategy == "fallback":
            return list(items)
        if strategy == "weighted":
            # Efraimidis-Spirakis: sorting by u^(1/w) draws a weighted order without replacement.
            return sorted(items, key=lambda i: self._rng() ** (1 / weight_of(i)), reverse=True)
        if strategy == "affinity" and affinity is not None:
            return sorted(items, key=lambda i: _score(affinity, key_of(i), weight_of(i)))
        rotated = self._rotate(group, items)
        if strategy in ("least_busy", "affinity"):  # affinity without a key: least busy
            return sorted(rotated, key=lambda i: self.in_flight[key_of(i)])  # stable: ties rotate
        return rotated

    def _rotate(self, group: str, items: Sequence[T]) -> list[T]:
        start = next(self._turns[group]) % len(items)
        return [*items[start:], *items[:start]]

    def busy(self, key: str) -> _Busy:
        """``with balancer.busy(key):`` counts a call in flight for least_busy."""
        return _Busy(self.in_flight, key)


class _Busy:
    """A plain class, not @contextmanager: twice per call, on the hot path."""

    __slots__ = ("counts", "key")

    def __init__(self, counts: dict[str, int], key: str) -> None:
        self.counts, self.key = counts, key

    def __enter__(self) -> None:
        self.counts[self.key] += 1

    def __exit__(self, *exc: object) -> None:
        self.counts[self.key] -= 1


def _score(affinity: str, key: str, weight: float) -> float:
    digest = hashlib.blake2b(f"{affinity}\0{key}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / 2**64  # in (0, 1]
    # Weighted rendezvous hashing: the lowest -ln(u)/w wins.
    return -math.log(unit) / weight


def conversation_prefix(fields: dict[str, Any]) -> str | None:
    """What stays the same across the turns of one conversation: the messages up to and
    including the first user message (system prompt + opening question), or the start
    of a completion prompt."""
    messages = fields.get("messages")
    if isinstance(messages, list) and messages:
        end = next(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
            len(messages) - 1,
        )
        return json.dumps(messages[: end + 1], sort_keys=True, ensure_ascii=False)
    prompt = fields.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt[:1024]
    return None
