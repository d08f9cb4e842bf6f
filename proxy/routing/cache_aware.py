"""``balance: cache_aware``: send a call to the replica most likely to hold its prompt's
prefix in its cache, unless that replica is overloaded.

For each candidate replica i (keys from routing/prefix_index.py):

    share_i = matched blocks / the call's blocks        (0..1)
    score_i = share_i - load_weight * in_flight_i

The call goes to the replica with the best score, except that

- a call that matches nowhere goes to the least loaded replica;
- when the best one has at least ``imbalance_calls`` more calls in flight than the least loaded
  AND more than ``imbalance_ratio`` times as many, the call goes to the least loaded
  instead (SGLang's router does the same: cache affinity until the load is lopsided).

Ties are broken by rendezvous hashing of the call's first block against each replica's
key, not by a counter or a random draw: two proxy processes with the same history and
loads choose alike, and a new conversation on a common system prompt lands where the
others with that prompt went. The chosen replica then records the call's keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config.model import CacheAware
from proxy.routing.prefix_index import BYTES_PER_BLOCK, PrefixIndex


@dataclass(frozen=True)
class Choice:
    """The replica chosen (its position among the candidates) and how much of the
    call's prompt it was estimated to hold: ``matched`` of ``blocks``."""

    index: int
    matched: int
    blocks: int


class PrefixRouter:
    """The prefix indexes of one group of replicas (an engine's, or a provider's
    endpoints), by replica key. Lives as long as its owner (supervisor or balancer)."""

    def __init__(self) -> None:
        self.indexes: dict[str, PrefixIndex] = {}

    def index(self, key: str, policy: CacheAware) -> PrefixIndex:
        found = self.indexes.get(key)
        if found is None:
            found = self.indexes[key] = PrefixIndex(max(1, policy.index_memory // BYTES_PER_BLOCK))
        return found

    def choose(
        self,
        keys: Sequence[str],
        loads: Sequence[int],
        blocks: Sequence[bytes],
        policy: CacheAware,
    ) -> Choice:
        """Choose among ``keys`` (``loads``: their calls in flight) and record the call."""
        indexes = [self.index(key, policy) for key in keys]
        matched = [index.matched(blocks) for index in indexes]
        first = blocks[0] if blocks else b""
        ties = [_rendezvous(first, key) for key in keys]
        least = max(range(len(keys)), key=lambda i: (-loads[i], ties[i]))
        chosen = least
        if blocks and max(matched) > 0:
            n, weight = len(blocks), policy.load_weight
            best = max(
                range(len(keys)), key=lambda i: (matched[i] / n - weight * loads[i], ties[i])
            )
            if not _imbalanced(loads[best], loads[least], policy):
                chosen = best
        indexes[chosen].add(blocks)
        return Choice(chosen, matched[chosen], len(blocks))


def _imbalanced(busy: int, idle: int, policy: CacheAware) -> bool:
    return busy - idle >= policy.imbalance_calls and busy > idle * policy.imbalance_ratio


def _rendezvous(first: bytes, key: str) -> bytes:
    """The highest wins: a deterministic draw per (prefix, replica)."""
    return hashlib.blake2b(first + key.encode(), digest_size=8).digest()
