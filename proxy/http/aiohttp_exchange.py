"""aiohttp's side of a proxied call: its handler, and the call's exchange over a request.

The lean front (proxy/http/front.py) serves ordinary calls itself; aiohttp carries the
rest (a chunked body, HTTP/1.0, Expect: 100-continue) through the handler below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.call.exchange import Sink, Streamed, body_late, too_large
from proxy.call.pipeline import proxied_call
from proxy.call.request import Api
from proxy.config.model import ServerSettings
from proxy.errors import BodyTooLarge
from proxy.http.middlewares import RECORD, to_response
from proxy.services import SERVICES, Services

_READ_SIZE = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def proxied(api: Api) -> Handler:
    """The aiohttp handler of a proxied route (the front serves ordinary calls itself)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        exchange = AiohttpExchange(request)
        outcome = await proxied_call(exchange, api, request[RECORD])
        if isinstance(outcome, Streamed):
            assert exchange.streamed is not None
            return exchange.streamed
        return to_response(outcome)

    handle.__name__ = f"proxy_{api.path.replace('/', '_')}"
    return handle


class AiohttpExchange:
    """A call aiohttp carries: its request, and the stream response once one started."""

    __slots__ = ("request", "services", "streamed")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        # Read once: the call reaches it several times, and Application.__getitem__
        # is a Python-level lookup.
        self.services: Services = request.app[SERVICES]
        self.streamed: web.StreamResponse | None = None

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
