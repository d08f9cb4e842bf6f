"""The order in which a call tries a provider's endpoints, or a model's targets.

Strategies: ``round_robin`` rotates; ``weighted`` draws an order at random in
proportion to weights; ``least_busy`` puts the replica with the fewest calls in
flight (in this process) first; ``affinity`` sends the same conversation prefix to
the same replica (rendezvous hashing, so removing one replica moves only its own
conversations), which lets an engine reuse its prefix cache; ``cache_aware`` sends a
call where its prompt's prefix was sent before unless that replica is overloaded
(routing/cache_aware.py). ``fallback`` keeps the configured order.

The same strategies choose among a local engine's ready replicas (``pick``), where
``weighted`` has no weights and is least busy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from proxy.config.model import CacheAware, Provider
from proxy.routing.cache_aware import Choice, PrefixRouter
from proxy.routing.prefix_index import prefix_keys, prompt_text

T = TypeVar("T")
DEFAULT_POLICY = CacheAware()


class Balancer:
    """Round-robin counters and in-flight counts; kept on the app across reloads."""

    def __init__(self, rng: Callable[[], float] = random.random):
        self._rng = rng
        self._turns: dict[str, itertools.count[int]] = defaultdict(itertools.count)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.prefixes: dict[str, PrefixRouter] = defaultdict(PrefixRouter)

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
        # affinity without a key, cache_aware without a prompt: least busy
        if strategy in ("least_busy", "affinity", "cache_aware"):
            return sorted(rotated, key=lambda i: self.in_flight[key_of(i)])  # stable: ties rotate
        return rotated

    def cache_aware(
        self, group: str, items: Sequence[T], key_of: Callable[[T], str], hint: Hint
    ) -> tuple[list[T], Choice]:
        """The replica cache_aware chooses first, then the others least busy first."""
        keys = [key_of(i) for i in items]
        loads = [self.in_flight[k] for k in keys]
        choice = self.prefixes[group].choose(keys, loads, hint.blocks, hint.policy)
        rest = sorted(
            (i for n, i in enumerate(items) if n != choice.index),
            key=lambda i: self.in_flight[key_of(i)],
        )
        return [items[choice.index], *rest], choice

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


@dataclass(frozen=True)
class Hint:
    """What a call tells the choice of a replica about its prompt, made only for the
    balances that read it (the others pay nothing): the conversation prefix for
    ``affinity``, the prefix keys for ``cache_aware``."""

    balance: str
    affinity: str | None = None
    blocks: tuple[bytes, ...] = ()
    policy: CacheAware = DEFAULT_POLICY


# The hints that carry nothing of the call, made once: no allocation per call.
_PLAIN = {balance: Hint(balance) for balance in ("round_robin", "weighted", "least_busy")}


def call_hint(provider: Provider, fields: dict[str, Any], replicas: int) -> Hint | None:
    """The call's hint for ``provider``'s ``replicas``; None where nothing is to choose."""
    if replicas < 2:
        return None
    if provider.balance == "affinity":
        return Hint("affinity", affinity=conversation_prefix(fields))
    if provider.balance == "cache_aware":
        text = prompt_text(fields)
        if text is None:  # no prompt to match (embeddings): spread them, least busy
            return _PLAIN["least_busy"]
        blocks = prefix_keys(text, provider.cache_aware.block_bytes)
        return Hint("cache_aware", blocks=blocks, policy=provider.cache_aware)
    return _PLAIN.get(provider.balance)


def pick(
    hint: Hint | None, keys: Sequence[str], loads: Sequence[int], prefixes: PrefixRouter
) -> tuple[int, Choice | None]:
    """Which of an engine's ready replicas takes the call: a position in ``keys``, which
    come in the order of the engine's rotation (so ties rotate), and for cache_aware the
    estimate of the prefix it holds. Without a hint: the least busy."""
    balance = "least_busy" if hint is None else hint.balance
    if balance == "round_robin":
        return 0, None
    if balance == "affinity" and hint is not None and hint.affinity is not None:
        affinity = hint.affinity
        return min(range(len(keys)), key=lambda i: _score(affinity, keys[i], 1.0)), None
    if balance == "cache_aware" and hint is not None:
        choice = prefixes.choose(keys, loads, hint.blocks, hint.policy)
        return choice.index, choice
    return min(range(len(keys)), key=lambda i: loads[i]), None  # first of equals: rotates


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
