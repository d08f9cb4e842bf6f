"""Token usage: what an upstream reported, or an estimate when it reported nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers
# The largest token count the proxy takes, from a client (max_tokens, n: request_checks)
# or an upstream (its usage): no model generates 2**31 tokens. Bounded, a reservation
# stays below 2**62, which both stores take; a reported count above it (or below 0, or
# a bool) is no count an upstream can mean, and booking it would hurt: Redis refuses to
# add a number beyond 64 bits (the settlement would stay queued, and every one behind
# it), and a negative count would take tokens back from the team's limits and ledger.
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool = False
    # Of the prompt tokens, those the upstream served from its prompt cache
    # (usage.prompt_tokens_details.cached_tokens): billed at the cached_input price.
    cached_tokens: int = 0


def reported(payload: Any) -> Usage | None:
    """The ``usage`` object of a response or stream chunk, if it has a real one."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not (_count(prompt) and _count(completion)):
        return None
    return Usage(prompt, completion, cached_tokens=_cached(usage, prompt))


def _cached(usage: dict[str, Any], prompt: int) -> int:
    """The cached prompt tokens, at most the prompt's; 0 if not reported as a count."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return min(cached, prompt) if _count(cached) else 0


def _count(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= MAX_COUNT


def estimate_prompt(fields: dict[str, Any]) -> int:
    """A cheap upper-ish estimate from the request, for reservations and missing usage."""
    messages = fields.get("messages")
    if isinstance(messages, list):
        text = sum(len(_text(m.get("content"))) for m in messages if isinstance(m, dict))
        return text // CHARS_PER_TOKEN + 4 * len(messages) + 3
    source = fields.get("prompt", fields.get("input", ""))
    return len(_text(source)) // CHARS_PER_TOKEN + 1


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False) if value is not None else ""


def estimate_completion(payload: Any) -> int:
    """From a plain answer's choices, when the upstream sent no usage."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list):
        return 0
    text = 0
    for choice in choices:
        if isinstance(choice, dict):
            message = choice.get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            text += len(_text(content if content is not None else choice.get("text")))
    return text // CHARS_PER_TOKEN


def reservation(fields: dict[str, Any], prompt: int, default_max_tokens: int) -> int:
    """Tokens to hold at admission: the prompt estimate plus what the call may generate.
    ``default_max_tokens``: the model's max_tokens default if it sets one (then already
    in ``fields`` when the client named no cap), else accounting.default_max_tokens."""
    if "input" in fields and "messages" not in fields and "prompt" not in fields:
        return prompt  # embeddings generate nothing
    limit = fields.get("max_completion_tokens")
    if limit is None:  # absent or null: the other name, if the call gives it
        limit = fields.get("max_tokens")
    most = limit if isinstance(limit, int) and limit > 0 else default_max_tokens
    n = fields.get("n")
    return prompt + most * (n if isinstance(n, int) and n > 0 else 1)


def final_usage(
    prompt_estimate: int, reported: Usage | None, completion_estimate: int | None
) -> Usage:
    """What to book: the upstream's own count, else an estimate (the prompt's from
    admission), else nothing (no answer)."""
    if reported is not None:
        return reported
    if completion_estimate is None:
        return Usage(0, 0)
    return Usage(prompt_estimate, completion_estimate, estimated=True)
