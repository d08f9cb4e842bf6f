"""Step 5 of a call: try the model's targets in order until one answers.

A target is passed over when its provider has no key, cannot be reached, times out,
or answers 429 or 5xx before anything went to the client, and when it is a local
engine that does not get ready in time. Other answers, including
4xx, are the client's answer and are relayed as the upstream sent them. When every
target fails, the client gets the last upstream answer if there was one, otherwise
the proxy's own 502/504/503 naming what each target did.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.appkeys import CLIENT_SESSION, ENGINES
from proxy.body import Body
from proxy.config import Config, Model, Provider, Target
from proxy.engines.lease import served_by
from proxy.errors import (
    EngineUnavailable,
    ProviderUnavailable,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.headers import upstream_headers
from proxy.record import CallRecord
from proxy.relay import is_stream, read_plain, relay_stream
from proxy.upstream import open_call

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Call:
    """Everything step 5 needs, and nothing about who the caller is."""

    config: Config
    model: Model
    endpoint: str
    body: Body


class _Failed(Exception):
    """One target's failure; ``answer`` holds the upstream's own reply when it sent one."""

    def __init__(self, summary: str, error: ProxyError | None, answer: web.Response | None):
        super().__init__(summary)
        self.error = error
        self.answer = answer


async def forward(request: web.Request, call: Call, record: CallRecord) -> web.StreamResponse:
    session = request.app[CLIENT_SESSION]
    failures: list[_Failed] = []
    for target in call.model.targets:
        provider = call.config.providers[target.provider]
        record.provider = provider.name
        try:
            return await _attempt(request, session, call, target, provider, record)
        except _Failed as failed:
            record.attempts.append(f"{provider.name}:{failed}")
            failures.append(failed)
    return _all_failed(call.model, failures)


async def _attempt(
    request: web.Request,
    session: aiohttp.ClientSession,
    call: Call,
    target: Target,
    provider: Provider,
    record: CallRecord,
) -> web.StreamResponse:
    if provider.missing_key_var:
        raise _Failed(
            "no key",
            ProviderUnavailable(
                f"Provider '{provider.name}' has no API key: the environment variable "
                f"{provider.missing_key_var} is not set."
            ),
            None,
        )
    try:
        # A local engine lends one ready replica for the whole call, stream included.
        async with served_by(request.app[ENGINES], provider) as served:
            return await _call(request, session, call, target, served, record)
    except EngineUnavailable as exc:
        raise _Failed("engine not ready", exc, None) from None


async def _call(
    request: web.Request,
    session: aiohttp.ClientSession,
    call: Call,
    target: Target,
    provider: Provider,
    record: CallRecord,
) -> web.StreamResponse:
    headers = upstream_headers(request.headers, provider)
    try:
        response = await open_call(
            session, provider, call.endpoint, call.body.with_model(target.model), headers
        )
    except ProxyError as exc:
        raise _Failed(exc.code or "error", exc, None) from None
    try:
        if response.status in RETRYABLE_STATUS:
            answer = await _answer_or_error(response, provider)
            raise _Failed(str(response.status), None, answer)
        if is_stream(response):
            record.attempts.append(f"{provider.name}:{response.status}")
            return await relay_stream(request, response, provider, record)
        answer = await _answer_or_error(response, provider)
        record.attempts.append(f"{provider.name}:{response.status}")
        return answer
    finally:
        # Closing (not releasing) drops the connection if the body was not read to
        # the end, which is how a client that went away cancels the upstream call.
        response.close()


async def _answer_or_error(response: aiohttp.ClientResponse, provider: Provider) -> web.Response:
    try:
        return await read_plain(response, provider)
    except ProxyError as exc:
        raise _Failed(exc.code or "error", exc, None) from None


def _all_failed(model: Model, failures: list[_Failed]) -> web.StreamResponse:
    answers = [f.answer for f in failures if f.answer is not None]
    if answers:
        return answers[-1]
    errors = [f.error for f in failures if f.error is not None]
    summary = "; ".join(
        f"{t.provider}: {e.message}" for t, e in zip(model.targets, errors, strict=False)
    )
    message = f"All targets of model '{model.id}' failed. {summary}"
    if all(isinstance(e, ProviderUnavailable) for e in errors):
        return type(errors[-1])(message).response()
    if isinstance(errors[-1], UpstreamTimeout):
        return UpstreamTimeout(message).response()
    return UpstreamUnreachable(message).response()
