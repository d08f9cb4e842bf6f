"""The lean front: ordinary calls to the proxied routes, served without aiohttp's server.

Counted by callgrind, aiohttp's server spends about 190k instructions on a request
before a handler runs; a bare protocol on the same loop spends 8k. The front reads
each request head itself (proxy/http/wire.py), runs an ordinary call through the pipeline
and answers it in one write, keeping the connection alive. The first request that is
not ordinary (another path, a chunked body, HTTP/1.0, a head it does not trust) hands
the connection, with every byte not yet consumed, to aiohttp's own protocol, which
serves it from then on. Requests are served one at a time per connection: a pipelined
request waits in the buffer until the answer before it is out.

What one connection may make the process hold is bounded, as in aiohttp's server: the
front reads at most ``_READ_AHEAD`` bytes beyond the request being served, and while the
transport holds more than ``_WRITE_BUFFER`` unsent bytes (a client that does not read its
answers) it neither serves the next pipelined request nor reads on.

What aiohttp's server does for a call, the front does too: a client that goes away
cancels its call, an idle connection closes after ``keepalive_timeout`` (also the time a
client has to send a whole head), a shutdown lets calls in flight finish.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from aiohttp import web
from multidict import CIMultiDict

from proxy.answer import Answer
from proxy.call.exchange import Sink, Streamed, body_late, too_large
from proxy.call.headers import name_the_call
from proxy.call.pipeline import proxied_call
from proxy.call.record import CallRecord
from proxy.config.model import ServerSettings
from proxy.errors import BodyTooLarge
from proxy.http.middlewares import answered, finish, request_id
from proxy.http.routes import PROXIED
from proxy.http.wire import LAST_CHUNK, Head, HeadWriter, chunk, complete, read_head
from proxy.services import SERVICES, Services

# Read no further ahead than this beyond the request being served.
_READ_AHEAD = 64 * 1024
# Unsent answer bytes above which the transport pauses the front's writing (asyncio's and
# uvloop's default, set here so that the bound is the front's own).
_WRITE_BUFFER = 64 * 1024
# At shutdown, how long a connection accepted just before may take to send its first head.
_FIRST_HEAD_WAIT = 1.0


class FrontServer:
    """The protocol factory of the listening socket, and its connections' registry."""

    def __init__(self, app: web.Application, aiohttp_server: web.Server) -> None:
        self.app = app
        self.services = app[SERVICES]
        self.aiohttp_server = aiohttp_server
        self.keepalive = self.services.config.current.server.keepalive_timeout  # fixed at start
        self.heads = HeadWriter()
        self.connections: set[FrontConnection] = set()
        self.closing = False
        self._changed: asyncio.Event | None = None  # set while shutdown waits for first heads

    def __call__(self) -> FrontConnection:
        return FrontConnection(self)

    async def shutdown(self, grace: float) -> None:
        """Close idle connections; give calls in flight ``grace`` seconds, then cancel."""
        self.closing = True
        for connection in list(self.connections):
            if connection.task is None and not connection.fresh:
                connection.close()
        await self._first_heads(min(grace, _FIRST_HEAD_WAIT))
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)

    async def _first_heads(self, within: float) -> None:
        """A connection accepted just before the listener closed has a client sending its
        first request, which no client would retry if it were reset: serve it. Those
        that have not sent a whole head within ``within`` seconds are closed."""

        def waiting() -> list[FrontConnection]:
            return [c for c in self.connections if c.fresh and c.task is None]

        try:
            async with asyncio.timeout(within):
                while waiting():
                    self._changed = asyncio.Event()
                    await self._changed.wait()
        except TimeoutError:
            pass
        for connection in waiting():
            connection.close()

    def changed(self) -> None:
        """A connection began its first call, moved to aiohttp, or closed."""
        if self._changed is not None:
            self._changed.set()


class FrontListener:
    """The front's listening socket, beside aiohttp's runner rather than one of its
    sites: aiohttp has no public way to put another protocol behind a site. The runner's
    server (public: a protocol factory) serves the connections the front hands over."""

    def __init__(self, front: FrontServer, server: asyncio.Server) -> None:
        self.front, self.server = front, server

    @classmethod
    async def open(
        cls, runner: web.AppRunner, host: str, port: int, reuse_port: bool = False
    ) -> FrontListener:
        assert runner.server is not None, "the runner is set up first"
        front = FrontServer(runner.app, runner.server)
        server = await asyncio.get_running_loop().create_server(
            front,
            host,
            port,
            reuse_port=reuse_port,
            backlog=128,  # aiohttp's, not asyncio's 100
        )
        return cls(front, server)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self.server.sockets]

    async def close(self, grace: float) -> None:
        """Stop listening, then let the front's calls in flight finish (``grace``)."""
        self.server.close()
        await self.front.shutdown(grace)


class FrontConnection(asyncio.Protocol):
    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()  # once per connection, not per call
        self.transport = cast(asyncio.Transport, None)
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.wanted = 0  # bytes the call being served needs in the buffer
        self.arrived: asyncio.Future[None] | None = None  # waits for them
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused
        self.reading = True
        self.idle_since = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.fresh = True  # no call begun yet: its client is still sending the first head

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=_WRITE_BUFFER)
        self.server.connections.add(self)
        self.idle_timer = self.loop.call_later(self.server.keepalive, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.arrived is not None:
            if len(self.buffer) >= self.wanted:
                self.arrived.set_result(None)
                self.arrived = None
        elif self.task is None and self.drained is None:
            self._next()
        if len(self.buffer) > self.wanted + _READ_AHEAD:
            self.transport.pause_reading()
            self.reading = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.server.closing:
            self.server.changed()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.task is not None:
            self.task.cancel()  # the client went away: so does its call
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None
        if self.task is None and not self.transport.is_closing():
            self._go_on()  # the pipelined requests that waited for the client to read

    # serving

    def _next(self) -> None:
        if not complete(self.buffer):
            return
        head = read_head(self.buffer)
        if head is None:
            self._hand_over()
            return
        exchange = FrontExchange(self, head)
        self.wanted = head.size + head.length
        self.task = self.loop.create_task(self._serve(exchange))
        if self.fresh:
            self.fresh = False
            if self.server.closing:
                self.server.changed()

    async def _serve(self, exchange: FrontExchange) -> None:
        try:
            await self._call(exchange)
        except ConnectionResetError:  # gone mid-answer; the call was logged as a 499
            self.close()
        except asyncio.CancelledError:  # gone, or shutting down
            self.close()
            raise

    async def _call(self, exchange: FrontExchange) -> None:
        api = PROXIED[exchange.path]
        record = CallRecord(request_id=request_id())
        answer = await answered(proxied_call(exchange, api, record), exchange, record)
        if isinstance(answer, Answer) and not exchange.streaming:
            name_the_call(answer.headers, record)
            self._write_answer(answer, exchange)
        elif not isinstance(answer, Streamed):  # an error after a stream's head went out
            exchange.keep_alive = False
        record.status = answer.status
        finish(exchange, record)
        self._done(exchange.keep_alive)

    def _write_answer(self, answer: Answer, exchange: FrontExchange) -> None:
        body = answer.body
        if len(self.buffer) < self.wanted:  # a body not read (401, 413): do not wait for it
            exchange.keep_alive = False
        head = self.server.heads.head(answer.status, answer.headers, len(body), exchange.keep_alive)
        self.transport.write(head + body)

    def _done(self, keep_alive: bool) -> None:
        self.task = None
        if not keep_alive or self.server.closing or len(self.buffer) < self.wanted:
            self.close()
            return
        del self.buffer[: self.wanted]
        self.wanted = 0
        self.idle_since = time.monotonic()
        if self.drained is None:  # else resume_writing goes on, once the client reads
            self._go_on()

    def _go_on(self) -> None:
        """Serve a pipelined request, and read on while the buffer has room."""
        if self.buffer:
            self._next()
        if self.transport.get_protocol() is not self:  # handed over to aiohttp
            return
        if not self.reading and len(self.buffer) <= self.wanted + _READ_AHEAD:
            self.transport.resume_reading()
            self.reading = True

    def _hand_over(self) -> None:
        """aiohttp serves this connection from here on, from the unconsumed bytes."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.server.connections.discard(self)
        if self.server.closing:
            self.server.changed()
        handler = self.server.aiohttp_server()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if not self.reading:
            self.transport.resume_reading()
        data, self.buffer = bytes(self.buffer), bytearray()
        if data:
            handler.data_received(data)

    def _idle_check(self) -> None:
        due = self.idle_since + self.server.keepalive
        now = time.monotonic()
        if self.task is None and now >= due:
            self.close()
        else:
            left = due - now if self.task is None else self.server.keepalive
            self.idle_timer = self.loop.call_later(left, self._idle_check)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    # what the exchange needs

    async def body(self, head: Head, settings: ServerSettings) -> bytes:
        """The body of the call being served, once it is all in."""
        if len(self.buffer) < self.wanted:
            self.arrived = self.loop.create_future()
            if not self.reading:
                self.transport.resume_reading()
                self.reading = True
            try:
                async with asyncio.timeout(settings.body_timeout):
                    await self.arrived
            except TimeoutError:
                raise body_late(settings) from None
        return bytes(self.buffer[head.size : self.wanted])

    async def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport.write(data)
        if self.drained is not None:
            await self.drained


class FrontExchange:
    """A call the front carries (proxy/call/exchange.py's Exchange)."""

    __slots__ = ("connection", "head", "keep_alive", "streaming")

    method = "POST"

    def __init__(self, connection: FrontConnection, head: Head) -> None:
        self.connection = connection
        self.head = head
        self.keep_alive = head.keep_alive
        self.streaming = False

    @property
    def app(self) -> web.Application:
        return self.connection.server.app

    @property
    def services(self) -> Services:
        return self.connection.server.services

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def headers(self) -> CIMultiDict[str]:
        return self.head.headers

    async def read_body(self, settings: ServerSettings) -> bytes:
        limit = settings.max_body_bytes
        if self.head.length > limit:
            raise BodyTooLarge(too_large(limit))
        return await self.connection.body(self.head, settings)

    async def start_stream(self, status: int, headers: CIMultiDict[str]) -> Sink:
        self.streaming = True
        heads = self.connection.server.heads
        await self.connection.write(heads.head(status, headers, None, self.keep_alive))
        return self

    async def write(self, data: bytes) -> None:
        await self.connection.write(chunk(data))

    can_push = True

    def push(self, data: bytes) -> asyncio.Future[None] | None:
        transport = self.connection.transport
        if not transport.is_closing():
            transport.write(chunk(data))
        return self.connection.drained

    async def end(self) -> None:
        await self.connection.write(LAST_CHUNK)
