"""One proxied call's side of the client connection, whichever server carries it.

The lean front (proxy/http/front.py) serves ordinary calls to the proxied routes; aiohttp
serves everything else, and the same routes when a request is anything but ordinary
(a chunked body, HTTP/1.0, Expect: 100-continue). The pipeline sees only this: the
request's head, its body, and a way to answer with a stream. A whole answer is a
``web.Response`` the carrying server writes; a stream is written as it goes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import ServerSettings
from proxy.errors import BodyTooLarge, RequestTimeout

_READ_SIZE = 64 * 1024


class Sink(Protocol):
    """A stream's body on its way to the client, its head already sent."""

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def push(self, data: bytes) -> asyncio.Future[None] | None:
        """Write now, from a callback: None, or a future done once the client's full
        buffer drained. Only where ``can_push``; bytes for a client gone are dropped
        (its call is being cancelled)."""
        ...

    @property
    def can_push(self) -> bool: ...


class CallSite(Protocol):
    """Where a call came in: an aiohttp request, or a proxied call's exchange."""

    @property
    def app(self) -> web.Application: ...

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...


class Exchange(CallSite, Protocol):
    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...

    async def read_body(self, settings: ServerSettings) -> bytes:
        """At most ``max_body_bytes``, within ``body_timeout``."""
        ...

    async def start_stream(self, status: int, headers: CIMultiDict[str]) -> Sink:
        """Send a stream's head; its body follows through the sink."""
        ...


@dataclass(frozen=True)
class Streamed:
    """What a call answers when its answer was a stream, already written to the client."""

    status: int


Answer = web.Response | Streamed


class AiohttpExchange:
    """A call aiohttp carries: its request, and the stream response once one started."""

    __slots__ = ("request", "streamed")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.streamed: web.StreamResponse | None = None

    @property
    def app(self) -> web.Application:
        return self.request.app

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.request.headers

    async def read_body(self, settings: ServerSettings) -> bytes:
        request = self.request
        limit = settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(too_large(limit))
        if request.content.is_eof():
            # The whole body is already in (the usual case: it came with the head), so
            # no read below can wait, and a timer per request would only cost time.
            return await _bounded(request.content, limit)
        try:
            async with asyncio.timeout(settings.body_timeout):
                return await _bounded(request.content, limit)
        except TimeoutError:
            raise body_late(settings) from None

    async def start_stream(self, status: int, headers: CIMultiDict[str]) -> Sink:
        self.streamed = out = web.StreamResponse(status=status, headers=headers)
        await out.prepare(self.request)
        return _StreamResponseSink(out)


class _StreamResponseSink:
    """aiohttp's writes are coroutines: this sink cannot take pushed bytes."""

    __slots__ = ("out",)

    can_push = False

    def __init__(self, out: web.StreamResponse) -> None:
        self.out = out

    def push(self, data: bytes) -> asyncio.Future[None] | None:
        raise NotImplementedError("aiohttp's stream writes are awaited")

    async def write(self, data: bytes) -> None:
        await self.out.write(data)

    async def end(self) -> None:
        await self.out.write_eof()


async def _bounded(content: StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await content.read(_READ_SIZE):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(too_large(limit))
        parts.append(chunk)
    return b"".join(parts)


def too_large(limit: int) -> str:
    return f"The request body is larger than this proxy accepts ({limit} bytes)."


def body_late(settings: ServerSettings) -> RequestTimeout:
    return RequestTimeout(
        f"The request body did not arrive within {settings.body_timeout:g} seconds."
    )
