"""The answer when every target failed: what each one did, in one error.

With a single provider tried, its last answer is relayed exactly as it was sent. With
several, the client gets the proxy's OpenAI-shaped error that names what each target
answered; its status, type and code (and Retry-After) are those of the last upstream
answer if there was one, so that a client still sees a 429 as a 429.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.answer import Answer
from proxy.call.attempt import AttemptFailed
from proxy.config.model import Model
from proxy.errors import (
    BadUpstreamResponse,
    CircuitOpen,
    ProviderUnavailable,
    ProxyError,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
    json_error,
)


@dataclass(frozen=True)
class Failure:
    provider: str
    failed: AttemptFailed

    def describe(self) -> str:
        answer = self.failed.answer
        if answer is not None:
            return f"{self.provider}: HTTP {answer.status} {_message(answer)}".rstrip(" .")
        error = self.failed.error
        return f"{self.provider}: {error.message if error else self.failed.detail}".rstrip(".")


def all_failed(model: Model, failures: list[Failure]) -> Answer:
    answers = [f.failed.answer for f in failures if f.failed.answer is not None]
    if answers and len({f.provider for f in failures}) == 1 and failures[-1].failed.answer:
        return failures[-1].failed.answer
    message = f"All targets of model '{model.id}' failed. " + "; ".join(
        f.describe() for f in failures
    )
    if answers:
        return _like_answer(answers[-1], message)
    errors = [f.failed.error for f in failures if f.failed.error is not None]
    return _proxy_error(errors, message).response()


def _proxy_error(errors: list[ProxyError], message: str) -> ProxyError:
    if errors and isinstance(errors[-1], RateLimited):  # a local engine's queue: a 429
        return RateLimited(message, retry_after=errors[-1].retry_after, param=errors[-1].param)
    if errors and all(isinstance(e, ProviderUnavailable | CircuitOpen) for e in errors):
        kind = type(errors[-1])
        return kind(message)
    if errors and all(isinstance(e, BadUpstreamResponse) for e in errors):
        return BadUpstreamResponse(message)
    if errors and isinstance(errors[-1], UpstreamTimeout):
        return UpstreamTimeout(message)
    return UpstreamUnreachable(message)


def _like_answer(answer: Answer, message: str) -> Answer:
    upstream = _error_fields(answer)
    response = json_error(
        answer.status,
        error_body(
            message,
            upstream.get("type") or "server_error",
            upstream.get("code"),
        ),
    )
    if "Retry-After" in answer.headers:
        response.headers["Retry-After"] = answer.headers["Retry-After"]
    return response


def _error_fields(answer: Answer) -> dict[str, Any]:
    try:
        error = json.loads(answer.body)["error"]
    except (ValueError, KeyError, TypeError, RecursionError):  # the upstream's body: anything
        return {}
    return error if isinstance(error, dict) else {"message": str(error)}


def _message(answer: Answer) -> str:
    message = _error_fields(answer).get("message")
    return str(message)[:200] if message else ""
