"""The proxy's own errors, in the OpenAI shape.

Every error the proxy itself answers with is a ``ProxyError``; a middleware turns it
into ``{"error": {"message", "type", "param", "code"}}`` with its status. Errors
that an upstream answered with are not ProxyErrors: they are relayed as sent.

    ProxyError
    ├── InvalidRequest          400 invalid_request_error
    ├── InvalidApiKey           401 invalid_api_key
    ├── AdminOnly               403 admin_key_required
    ├── ModelNotFound           404 model_not_found
    ├── BodyTooLarge            413 request_too_large
    ├── RateLimited             429 rate_limit_exceeded, with Retry-After
    │   └── EngineBusy          429 the same, param engine_queue (a local engine's queue)
    ├── LimiterUnavailable      503 rate_limiter_unavailable (Redis down, fail_closed)
    ├── RequestTimeout          408 request_timeout (the client sent its body too slowly)
    ├── ProviderUnavailable     503 provider_unavailable (e.g. its key is not set)
    │   └── EngineUnavailable   503 engine_unavailable (a local engine is not ready in time)
    ├── CircuitOpen             503 circuit_open (every endpoint is cooling down)
    ├── UpstreamUnreachable     502 upstream_unreachable
    ├── BadUpstreamResponse     502 bad_upstream_response (a 200 that is not what it says)
    └── UpstreamTimeout         504 upstream_timeout
"""

from __future__ import annotations

import json
import math
from typing import Any

from multidict import CIMultiDict

from proxy.answer import Answer


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> Answer:
        return json_error(self.status, self.body())


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = None


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ProviderUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "provider_unavailable"


class EngineUnavailable(ProviderUnavailable):
    code = "engine_unavailable"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_error(status: int, body: dict[str, Any]) -> Answer:
    headers = CIMultiDict({"Content-Type": "application/json"})
    return Answer(status, headers, json.dumps(body).encode())


class CircuitOpen(ProxyError):
    status = 503
    type = "server_error"
    code = "circuit_open"


class BadUpstreamResponse(ProxyError):
    status = 502
    type = "server_error"
    code = "bad_upstream_response"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class InvalidApiKey(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class AdminOnly(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "admin_key_required"


def retry_seconds(retry_after: float) -> int:
    """Retry-After's whole seconds: rounded up, and at least 1."""
    return max(1, math.ceil(retry_after))


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message, param=param)
        self.retry_after = retry_after
        self.headers = headers or {}

    def response(self) -> Answer:
        response = super().response()
        response.headers.update(self.headers)
        response.headers["Retry-After"] = str(retry_seconds(self.retry_after))
        return response


class QuotaExceeded(RateLimited):
    """A budget is spent: OpenAI's shape for an exhausted quota."""

    type = "insufficient_quota"
    code = "insufficient_quota"


class EngineBusy(RateLimited):
    """A local engine's queue is full, or a call waited in it past ``engine.queue.wait``.
    The same type and code as a team's limit, so clients retry it alike; ``param``
    says which limit it was."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message, retry_after=retry_after, param="engine_queue")


class LimiterUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "rate_limiter_unavailable"
