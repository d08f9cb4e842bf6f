"""Token usage as the upstream reported it, read cheaply from the bytes being relayed.

Only the ``"usage"`` object is decoded, found by searching from the end of the body
(where OpenAI-compatible APIs put it), so a large embeddings answer is not parsed
whole. Streams are never parsed chunk by chunk: the relay hands over its last few
chunks, where the usage event comes when the client asked for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_KEY = b'"usage"'
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Usage:
    prompt: int
    completion: int


def find_usage(data: bytes) -> Usage | None:
    """The last ``"usage": {...}`` in a JSON body or in the tail of an SSE stream."""
    at = data.rfind(_KEY)
    if at < 0:
        return None
    colon = data.find(b":", at + len(_KEY))
    if colon < 0:
        return None
    text = data[colon + 1 :].decode("utf-8", "replace").lstrip()
    try:
        value, _ = _DECODER.raw_decode(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None  # "usage": null, as some providers send in every chunk
    prompt = value.get("prompt_tokens", 0)
    completion = value.get("completion_tokens", 0)
    if not _count(prompt) or not _count(completion):
        return None
    return Usage(prompt, completion)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
