"""The token estimates that reservations and, when an upstream reports no usage, the
ledger rest on: about 4 characters a token (README, "Tokens are reserved, then
corrected"), plus OpenAI's per-message overhead for chats.

Pure functions of the request and the answer, so they are checked directly; the
mutation run (docs/TESTING.md) found the end-to-end tests blind to their arithmetic.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.usage import estimate_completion, estimate_prompt


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
        ({"choices": [{"message": {"content": None}, "text": "t" * 8}]}, 2),
        ({"choices": [{"message": "odd", "text": "t" * 8}, "odd"]}, 2),
        ({"choices": "odd"}, 0),
        (["not", "an", "object"], 0),
    ],
)
def test_completion_estimate(payload: Any, tokens: int) -> None:
    assert estimate_completion(payload) == tokens
