"""Steps 2 and 3 of a call: a bounded body, the fields the proxy relies on, and the route."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import StreamReader, web

from proxy.body import Body, parse_body
from proxy.config import Config, Model, ServerSettings
from proxy.errors import BodyTooLarge, InvalidRequest, ModelNotFound, RequestTimeout

_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Endpoint:
    """One proxied API: its path below the provider's base_url and its required fields."""

    path: str
    required: tuple[str, ...]


CHAT = Endpoint("chat/completions", ("messages",))
COMPLETIONS = Endpoint("completions", ("prompt",))
EMBEDDINGS = Endpoint("embeddings", ("input",))

# Known fields whose type the proxy itself depends on; everything else passes untouched.
_TYPES: dict[str, tuple[type, ...]] = {
    "messages": (list,),
    "stream": (bool,),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "stream_options": (dict,),
}


async def read_body(request: web.Request, settings: ServerSettings) -> bytes:
    """At most ``max_body_bytes``, within ``body_timeout``; refused early by Content-Length."""
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(_too_large(limit))
    if request.content.is_eof():
        # The whole body is already in (the usual case: it came with the head), so no
        # read below can wait, and a timer per request would only cost time.
        return await _bounded(request.content, limit)
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await _bounded(request.content, limit)
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {settings.body_timeout:g} seconds."
        ) from None


async def _bounded(content: StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await content.read(_READ_SIZE):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(_too_large(limit))
        parts.append(chunk)
    return b"".join(parts)


def call_budget(request: web.Request, budget: float) -> float:
    """The model's retry budget, narrowed by the client's own ``X-Request-Timeout``."""
    asked = request.headers.get("X-Request-Timeout")
    try:
        seconds = float(asked) if asked else budget
    except ValueError:
        return budget
    return min(budget, seconds) if seconds > 0 else budget


def _too_large(limit: int) -> str:
    return f"The request body is larger than this proxy accepts ({limit} bytes)."


def checked_body(raw: bytes, endpoint: Endpoint) -> Body:
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    body = parse_body(raw)
    fields = body.fields
    model = fields.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a non-empty string.", param="model")
    for name in endpoint.required:
        if name not in fields:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
    for name, types in _TYPES.items():
        value = fields.get(name)
        if value is not None and not _has_type(value, types):
            expected = " or ".join(t.__name__ for t in types)
            raise InvalidRequest(
                f"Invalid type for '{name}': expected {expected}, got {type(value).__name__}.",
                param=name,
            )
    return body


def _has_type(value: object, types: tuple[type, ...]) -> bool:
    # bool is an int in Python, not in JSON: `"max_tokens": true` is a type error.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def route(config: Config, model_id: str) -> Model:
    model = config.models.get(model_id)
    if model is None:
        available = ", ".join(sorted(config.models)) or "none"
        raise ModelNotFound(
            f"The model '{model_id}' does not exist. Available models: {available}.",
            param="model",
        )
    return model
