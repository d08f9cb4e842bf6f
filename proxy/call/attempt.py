"""One attempt: call one endpoint, and decide whether its answer is the client's.

An answer becomes the client's when it is a success or a client error (4xx other than
429). Everything else raises ``AttemptFailed`` while nothing has reached the client,
so that the caller can retry or fall back: 429 and 5xx answers, transport errors and
timeouts, a 200 whose JSON does not parse, a stream whose first bytes are not SSE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from proxy.answer import Answer
from proxy.call.exchange import Exchange, Outcome
from proxy.call.headers import NOT_TO_UPSTREAM, upstream_headers
from proxy.call.record import CallRecord
from proxy.call.relay import read_plain, relay_stream
from proxy.call.sse import SseTap
from proxy.config.model import Endpoint, Provider
from proxy.errors import BadUpstreamResponse, ProxyError
from proxy.limits.usage import Usage, estimate_completion, reported
from proxy.routing.backoff import retry_after_seconds
from proxy.upstream.call import open_call, read_chunk
from proxy.upstream.client import UpstreamClient
from proxy.upstream.response import UpstreamResponse

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:", b"\n", b"\r")


class AttemptFailed(Exception):
    """``answer`` is the upstream's own reply when it sent one; ``endpoint_fault`` says
    whether the failure counts against the endpoint's circuit (a 429 does not)."""

    def __init__(
        self,
        detail: str,
        *,
        error: ProxyError | None = None,
        answer: Answer | None = None,
        retry_after: float | None = None,
        endpoint_fault: bool = True,
        usage: Usage | None = None,
    ):
        super().__init__(detail)
        self.detail = detail
        self.error = error
        self.answer = answer
        self.retry_after = retry_after
        self.endpoint_fault = endpoint_fault
        self.usage = usage  # what the upstream said the failed attempt used: it is billed


@dataclass(frozen=True)
class Upstream:
    """Where an attempt goes: the provider, one of its endpoints, the API path, the
    caller's extra headers for this provider, the client headers it does not get, and
    the most a whole answer may hold."""

    provider: Provider
    endpoint: Endpoint
    path: str
    headers: Mapping[str, str]
    max_answer_bytes: int
    not_forwarded: AbstractSet[str] = NOT_TO_UPSTREAM


async def attempt(
    exchange: Exchange,
    client: UpstreamClient,
    upstream: Upstream,
    body: bytes,
    record: CallRecord,
    strip_usage: bool,
) -> Outcome:
    provider = upstream.provider
    headers = upstream_headers(exchange.headers, provider, upstream.headers, upstream.not_forwarded)
    url = upstream.endpoint.join(upstream.path)
    try:
        with record.waiting():
            response = await open_call(
                client, provider, url, body, headers, upstream.max_answer_bytes
            )
    except ProxyError as exc:
        raise AttemptFailed(exc.code or "error", error=exc) from None
    try:
        if response.status in RETRYABLE_STATUS:
            with record.waiting():
                answer = await _read(response, provider)
            raise AttemptFailed(
                str(response.status),
                answer=answer,
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                endpoint_fault=response.status != 429,
                usage=_failed_usage(answer),
            )
        if response.is_stream:
            with record.waiting():
                first = await _first_chunk(response, provider)
            return await relay_stream(
                exchange, response, provider, record, first, SseTap(strip_usage)
            )
        with record.waiting():
            answer = await _read(response, provider)
        if response.status == 200 and response.content_type == "application/json":
            _note_usage(record, answer, provider)
        return answer
    finally:
        # Closing (not releasing) drops the connection if the body was not read to
        # the end, which is how a client that went away cancels the upstream call.
        response.close()


async def _read(response: UpstreamResponse, provider: Provider) -> Answer:
    try:
        return await read_plain(response, provider)
    except ProxyError as exc:
        raise AttemptFailed(exc.code or "error", error=exc) from None


async def _first_chunk(response: UpstreamResponse, provider: Provider) -> bytes:
    """Read the first bytes before the client sees anything, so a dud can still fail over."""
    try:
        first = await read_chunk(response, provider)
    except ProxyError as exc:
        raise AttemptFailed(exc.code or "error", error=exc) from None
    if not any(first.startswith(s) or s.startswith(first) for s in _SSE_STARTS) or not first:
        raise AttemptFailed(
            "bad_upstream_response",
            error=BadUpstreamResponse(
                f"Provider '{provider.name}' answered text/event-stream with something else: "
                f"{first[:80]!r}"
            ),
        )
    return first


def _failed_usage(answer: Answer) -> Usage | None:
    """The usage a failed answer reports, if any (rare: most error bodies have none)."""
    if b'"usage"' not in answer.body:
        return None
    try:
        return reported(json.loads(answer.body))
    except (ValueError, RecursionError):
        return None


def _note_usage(record: CallRecord, answer: Answer, provider: Provider) -> None:
    """Read the usage of a JSON 200, which must parse: it is retried like a dud if not.
    RecursionError too: JSON nested thousands deep (json's C code and ``usage``'s
    walk both recurse) is the upstream's fault, not a reason for a 500."""
    try:
        payload = json.loads(answer.body)
        record.usage = reported(payload)
        record.completion_estimate = estimate_completion(payload)
    except (ValueError, RecursionError):
        raise AttemptFailed(
            "bad_upstream_response",
            error=BadUpstreamResponse(
                f"Provider '{provider.name}' answered 200 with a body that is not valid JSON "
                "(or is nested too deeply)."
            ),
        ) from None
