"""What each replica has probably cached: a bounded, approximate index of the prompt
prefixes it served, for ``balance: cache_aware`` (routing/cache_aware.py).

A call's prompt is cut into fixed-size blocks of its serialized messages (UTF-8 bytes,
``block_bytes`` each, the last one shorter). Block i's key is the BLAKE2b digest of
everything up to the end of block i (one running hash, read at each boundary), so a
key names a whole prefix, not a block on its own: two prompts share block i's key only
if they agree on every byte before it. A replica's index is the set of keys of the
prompts routed to it, in least-recently-used order, cut to ``max_blocks``; the match of
a call on a replica is the number of its leading keys found there.

Approximate on purpose: it records what the proxy sent, not what the engine kept (an
engine evicts by its own rules, another proxy process feeds the same engine), and an
8-byte digest may collide (one in 2^64 per pair). It only steers; a wrong guess costs
a prefill, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

# What one key costs in an OrderedDict: the 8-byte digest (a 41-byte bytes object), its
# share of the hash table (sized in powers of two, so it varies) and its link node:
# 150 to 215 bytes with tracemalloc on CPython 3.11, from 1,000 to 26,000 keys. Rounded
# up, so that ``memory // BYTES_PER_BLOCK`` keys stay under the memory asked.
BYTES_PER_BLOCK = 256
_RECORD = "\x1e"  # between messages: a message boundary is part of the prefix


def prompt_text(fields: dict[str, Any]) -> str | None:
    """The call's prompt as one string, message after message, from the fields the body
    parse already made (call/body.py): no second JSON parse. Plain string contents (the
    usual case) are joined as they are; any other message is dumped as JSON."""
    messages = fields.get("messages")
    if isinstance(messages, list) and messages:
        parts = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str) and len(m) == 2:  # {role, content}: the cheap way
                parts.append(f"{m.get('role')}:{content}")
            else:
                parts.append(json.dumps(m, sort_keys=True, ensure_ascii=False))
        return _RECORD.join(parts) + _RECORD
    prompt = fields.get("prompt")
    return prompt if isinstance(prompt, str) and prompt else None


def prefix_keys(text: str, block_bytes: int) -> tuple[bytes, ...]:
    """The chained keys of ``text``'s blocks: key i covers bytes [0, (i+1)*block_bytes)."""
    raw = text.encode()
    running = hashlib.blake2b(digest_size=8)
    keys = []
    for start in range(0, len(raw), block_bytes):
        running.update(raw[start : start + block_bytes])
        keys.append(running.digest())
    return tuple(keys)


class PrefixIndex:
    """One replica's keys, least recently used first, at most ``max_blocks`` of them."""

    __slots__ = ("_keys", "max_blocks")

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def matched(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, this replica holds. A key stands for its
        whole prefix, so the walk stops at the first one missing."""
        held = self._keys
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count

    def add(self, keys: Sequence[bytes]) -> None:
        """Record a prompt sent to this replica. The keys go in last to first, so that a
        prompt's earliest blocks (the system prompt many calls share) are the most
        recently used and the last to be evicted."""
        held = self._keys
        for key in reversed(keys):
            if key in held:
                held.move_to_end(key)
            else:
                held[key] = None
        while len(held) > self.max_blocks:
            held.popitem(last=False)
