"""What a call reserves and what the ledger books: the reservation (docs/configuration.md, "Tokens
are reserved, then corrected") and the token estimates it and, when an upstream reports
no usage, the ledger rest on: about 4 characters a token, plus OpenAI's per-message
overhead for chats.

Pure functions of the request and the answer, so they are checked directly; the
mutation run (docs/TESTING.md) found the end-to-end tests blind to their arithmetic.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.limits.usage import (
    Usage,
    estimate_completion,
    estimate_prompt,
    final_usage,
    reservation,
)


@pytest.mark.parametrize(
    ("fields", "tokens"),
    [
        # 40 characters of content in 2 messages: 40 // 4 + 4 per message + 3
        (
            {
                "messages": [
                    {"role": "system", "content": "x" * 12},
                    {"role": "user", "content": "y" * 28},
                ]
            },
            10 + 8 + 3,
        ),
        # content that is not a string (parts) counts as its JSON; no content as nothing
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            len('[{"type": "text", "text": "hi"}]') // 4 + 4 + 3,
        ),
        ({"messages": [{"role": "assistant", "content": None}, "not a message"]}, 0 + 8 + 3),
        # completions and embeddings: the prompt, else the input, + 1
        ({"prompt": "p" * 17, "input": "i" * 400}, 17 // 4 + 1),
        ({"input": "i" * 400}, 400 // 4 + 1),
        ({"input": ["é" * 8]}, len('["éééééééé"]') // 4 + 1),  # JSON keeps é as it is
        ({"model": "m"}, 1),
    ],
)
def test_prompt_estimate(fields: dict[str, Any], tokens: int) -> None:
    assert estimate_prompt(fields) == tokens


@pytest.mark.parametrize(
    ("payload", "tokens"),
    [
        ({"choices": [{"message": {"content": "a" * 21}}, {"message": {"content": "b" * 3}}]}, 6),
        ({"choices": [{"text": "t" * 9}]}, 2),  # a completion: the choice's text
        ({"choices": [{"text": "t" * 7}]}, 1),  # rounded down
        ({"choices": [{"message": {"content": None}, "text": "t" * 8}]}, 2),
        ({"choices": [{"message": "odd", "text": "t" * 8}, "odd"]}, 2),
        ({"choices": "odd"}, 0),
        (["not", "an", "object"], 0),
    ],
)
def test_completion_estimate(payload: Any, tokens: int) -> None:
    assert estimate_completion(payload) == tokens


@pytest.mark.parametrize(
    ("fields", "tokens"),
    [
        # docs/configuration.md: the prompt estimate plus max_tokens (or max_completion_tokens, or
        # the configured default) times n
        ({"messages": [], "max_tokens": 40}, 10 + 40),
        ({"messages": [], "max_completion_tokens": 30, "max_tokens": 40}, 10 + 30),
        ({"messages": [], "max_tokens": 40, "n": 3}, 10 + 120),
        ({"messages": []}, 10 + 50),
        ({"prompt": "p", "max_tokens": 1}, 10 + 1),
        # nonsense counts fall back to the default and to one choice
        ({"messages": [], "max_tokens": 0, "n": 0}, 10 + 50),
        ({"messages": [], "max_tokens": -5, "n": -2}, 10 + 50),
        ({"messages": [], "max_tokens": "40", "n": "3"}, 10 + 50),
        # embeddings generate nothing: the prompt alone
        ({"input": "text", "max_tokens": 40}, 10),
        ({"input": "text", "messages": [], "max_tokens": 40}, 10 + 40),
        ({"input": "text", "prompt": "p", "max_tokens": 40}, 10 + 40),
    ],
)
def test_reservation(fields: dict[str, Any], tokens: int) -> None:
    assert reservation(fields, prompt=10, default_max_tokens=50) == tokens


def test_what_is_booked() -> None:
    prompt_estimate = 12  # admission's estimate of the prompt
    assert final_usage(prompt_estimate, Usage(3, 4), 9) == Usage(3, 4)  # the upstream's first
    assert final_usage(prompt_estimate, None, 9) == Usage(12, 9, estimated=True)
    assert final_usage(prompt_estimate, None, None) == Usage(0, 0)  # no answer: nothing
