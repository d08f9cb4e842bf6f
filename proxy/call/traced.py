"""A call and its attempts under OpenTelemetry spans, when routes.yaml has ``telemetry:``.

The pipeline runs a call through ``traced_call`` and forward.py sends each attempt
through ``traced_attempt`` only with traces on; with them off, neither runs and the call
path pays one ``is None`` per call and per attempt. The spans themselves are
``proxy.observe.spans``' (imported only with traces on); this module knows the call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answer import Answer
from proxy.call.attempt import AttemptFailed, Upstream, attempt
from proxy.call.exchange import Exchange, Outcome, Sink
from proxy.call.record import CallRecord
from proxy.call.request import Api
from proxy.config.model import ServerSettings
from proxy.errors import ProxyError
from proxy.observe.span_facts import CallEnd
from proxy.services import Services
from proxy.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from proxy.observe.spans import Tracing

Run = Callable[[Exchange, Api, CallRecord], Awaitable[Outcome]]
# A stream's first bytes that are read for its model, at most.
_PEEK_BYTES = 64 * 1024


async def traced_call(
    tracing: Tracing, run: Run, exchange: Exchange, api: Api, record: CallRecord
) -> Outcome:
    """``run`` (the pipeline's call) inside the call's span."""
    trace = record.trace = tracing.call(exchange.headers, api.path)
    # The answer's model is read only for a span that is exported.
    watched = _WatchedExchange(exchange) if trace.recording else None
    status = 500
    error: str | None = "internal_error"
    outcome: Outcome | None = None
    try:
        outcome = await run(watched or exchange, api, record)
        status, error = outcome.status, None
        return outcome
    except ProxyError as exc:
        status, error = exc.status, exc.code or exc.type
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status, error = 499, "client_gone"
        raise
    finally:
        model = None
        if watched is not None:
            model = _answer_model(outcome) if isinstance(outcome, Answer) else watched.model
        trace.end(_ended(record, status, error, model))


def _ended(record: CallRecord, status: int, error: str | None, model: str | None) -> CallEnd:
    billed = record.billed
    return CallEnd(
        status=status,
        request_id=record.request_id,
        team=record.team,
        model=record.model,
        route=record.route,
        provider=record.provider,
        response_model=model,
        input_tokens=billed.prompt_tokens if billed else None,
        output_tokens=billed.completion_tokens if billed else None,
        tokens_estimated=billed.estimated if billed else False,
        error=error,
        stream_error=record.stream_error,
    )


async def traced_attempt(
    exchange: Exchange,
    client: UpstreamClient,
    upstream: Upstream,
    body: bytes,
    record: CallRecord,
    strip_usage: bool,
) -> Outcome:
    """``attempt`` inside its own span, whose traceparent goes upstream."""
    assert record.trace is not None  # forward.py sends attempts here only then
    span = record.trace.attempt(upstream.provider.name, upstream.endpoint.join(upstream.path))
    upstream = replace(upstream, headers=span.headers(upstream.headers))
    try:
        outcome = await attempt(exchange, client, upstream, body, record, strip_usage)
    except AttemptFailed as failed:
        span.end(failed.answer.status if failed.answer else None, failed.detail)
        raise
    except BaseException as exc:  # the client went away, mid-stream or before
        span.end(None, type(exc).__name__)
        raise
    span.end(outcome.status, None)
    return outcome


def _answer_model(answer: Answer) -> str | None:
    """The model a whole JSON answer names (parsed again: only with traces on)."""
    if answer.status != 200:
        return None
    try:
        return _model(json.loads(answer.body))
    except (ValueError, RecursionError):
        return None


def _model(payload: Any) -> str | None:
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) else None


class _WatchedExchange:
    """The call's exchange, but a stream's first events are read for the model the
    upstream answered with (every OpenAI chunk names it)."""

    __slots__ = ("inner", "model")

    def __init__(self, inner: Exchange) -> None:
        self.inner = inner
        self.model: str | None = None

    @property
    def services(self) -> Services:
        return self.inner.services

    @property
    def method(self) -> str:
        return self.inner.method

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        return self.inner.headers

    async def read_body(self, settings: ServerSettings) -> bytes:
        return await self.inner.read_body(settings)

    async def start_stream(self, status: int, headers: CIMultiDict[str]) -> Sink:
        return _WatchedSink(await self.inner.start_stream(status, headers), self)


class _WatchedSink:
    __slots__ = ("inner", "seen", "watcher")

    def __init__(self, inner: Sink, watcher: _WatchedExchange) -> None:
        self.inner, self.watcher = inner, watcher
        self.seen: bytes | None = b""  # the stream's start, until its model is found

    @property
    def can_push(self) -> bool:
        return self.inner.can_push

    def push(self, data: bytes) -> asyncio.Future[None] | None:
        self._watch(data)
        return self.inner.push(data)

    async def write(self, data: bytes) -> None:
        self._watch(data)
        await self.inner.write(data)

    async def end(self) -> None:
        await self.inner.end()

    def _watch(self, data: bytes) -> None:
        if self.seen is None:
            return
        self.seen += data
        *events, _ = self.seen.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and b'"model"' in line:
                    try:
                        self.watcher.model = _model(json.loads(line[5:]))
                    except (ValueError, RecursionError):
                        continue
                    if self.watcher.model is not None:
                        self.seen = None
                        return
        if len(self.seen) > _PEEK_BYTES:
            self.seen = None
