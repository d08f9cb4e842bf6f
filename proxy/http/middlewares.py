"""Around every request: a call record, the OpenAI error shape, one access-log line, metrics.

The access log names the call (request id, team, the key's name, model, provider,
endpoint, status, attempts, tokens, time to first token, duration) and never a key:
nothing from the request's headers is written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.answer import Answer
from proxy.call.headers import name_the_call
from proxy.call.record import Attempt, CallRecord
from proxy.errors import ProxyError, error_body, json_error
from proxy.http.call_metrics import observe_call
from proxy.observe.access_log import encode as encode_access_line
from proxy.observe.access_log import logged_model
from proxy.observe.access_log import write as write_access_line
from proxy.observe.metrics import endpoint_label
from proxy.services import SERVICES

log = logging.getLogger(__name__)
access_log = logging.getLogger("proxy.access")

RECORD = web.RequestKey("record", CallRecord)
A = TypeVar("A")


class CallSite(Protocol):
    """Where a call came in: an aiohttp request, or the front's exchange."""

    @property
    def app(self) -> web.Application: ...

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...


# Status aiohttp or the router raised → OpenAI error type.
_HTTP_TYPES = {404: "invalid_request_error", 405: "invalid_request_error"}


@web.middleware
async def calls(request: web.Request, handler: Handler) -> web.StreamResponse:
    record = CallRecord(request_id=request_id())
    request[RECORD] = record
    answer = await answered(handler(request), request, record)
    response = to_response(answer) if isinstance(answer, Answer) else answer
    if not response.prepared:  # a stream's relay named it before its headers went out
        name_the_call(response.headers, record)
    record.status = response.status
    finish(request, record)
    return response


async def answered(work: Awaitable[A], site: CallSite, record: CallRecord) -> A | Answer:
    """The call's own answer, or the OpenAI-shaped error it raised."""
    try:
        return await work
    except ProxyError as exc:
        return exc.response()
    except web.HTTPException as exc:
        return _http_error(exc)
    except (asyncio.CancelledError, ConnectionResetError):
        record.status = 499  # the client went away; nginx's name for it
        finish(site, record)
        raise
    except Exception:
        log.exception("unhandled error in %s %s", site.method, site.path)
        return json_error(
            500,
            error_body("The proxy failed to handle the request.", "server_error", "internal_error"),
        )


def request_id() -> str:
    """What ``uuid.uuid4().hex`` gives (random, version 4, RFC 4122 variant), without
    building a UUID object on every request."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def _http_error(exc: web.HTTPException) -> Answer:
    if exc.status == 404:
        message = "Unknown request URL. Please check the URL and method."
    else:
        message = exc.reason
    kind = _HTTP_TYPES.get(
        exc.status, "invalid_request_error" if exc.status < 500 else "server_error"
    )
    response = json_error(
        exc.status, error_body(message, kind, exc.reason.lower().replace(" ", "_"))
    )
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


def to_response(answer: Answer) -> web.Response:
    """The proxy's answer as aiohttp's response (the front writes it itself)."""
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body)


def finish(site: CallSite, record: CallRecord) -> None:
    """The call is answered: count it, and write its access-log line."""
    elapsed = record.elapsed()
    observe_call(site.app[SERVICES].metrics, record, elapsed)
    if access_log.isEnabledFor(logging.INFO):
        write_access_line(encode_access_line(_access_line(site, record, elapsed)))


def _access_line(site: CallSite, record: CallRecord, elapsed: float) -> dict[str, Any]:
    billed = record.billed
    line: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "request_id": record.request_id,
        "method": site.method,
        "path": site.path,
        "api": record.api,
        "team": record.team,
        "key": record.key,  # its name in routes.yaml, never the key
        "model": logged_model(record.model),
        "provider": record.provider,
        "endpoint": endpoint_label(record.endpoint) if record.endpoint else None,
        "status": record.status,
        "attempts": [_attempt(a) for a in record.attempts],
        "prompt_tokens": billed.prompt_tokens if billed else None,
        "completion_tokens": billed.completion_tokens if billed else None,
        "tokens_estimated": billed.estimated if billed else None,
        "ttft_ms": _ms(record.first_byte - record.started) if record.first_byte else None,
        "duration_ms": _ms(elapsed),
    }
    if record.stream_error:
        line["stream_error"] = record.stream_error
    return line


def _attempt(a: Attempt) -> dict[str, str]:
    # By hand: dataclasses.asdict deep-copies recursively, at a cost on every call.
    return {
        "provider": a.provider,
        # Through endpoint_label like the line's own "endpoint": a URL's userinfo (a
        # password) must not reach the log. "-" (no endpoint was tried) stays as it is.
        "endpoint": endpoint_label(a.endpoint) if "://" in a.endpoint else a.endpoint,
        "outcome": a.outcome,
        "detail": a.detail,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
