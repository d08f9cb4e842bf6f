"""An upstream's answer as it arrives on its connection: status and headers once they are
in, then the body read by read.

The connection (upstream/client.py) parses the bytes and calls ``begin``, ``body``,
``end`` or ``fail``; the caller awaits ``started()``, then ``readany()`` until b"",
and always ends with ``close()``, which hands the connection back or drops it. A body
that stops short raises ``UpstreamConnectionError`` at the read that would have had
the rest; a deadline that passes raises TimeoutError.

A stream's relay may instead ``pipe`` the body: each piece then goes to its receiver
the moment the connection parsed it, without waking the relay's task per piece, and
``readany()`` only waits for the end (b"") or the failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDictProxy

# Stop reading the socket when this much body waits for a slow client; the upstream
# then feels the back-pressure instead of the proxy's memory.
_HIGH_WATER = 256 * 1024


class UpstreamConnectionError(Exception):
    """The connection could not be made, broke, or carried something that is not HTTP."""


class AnswerRefused(UpstreamConnectionError):
    """The answer broke one of the proxy's limits (its head's size, its body's): the
    connection is dropped, and the attempt is a bad answer, not an unreachable upstream."""


class Carrier(Protocol):
    """What an answer needs of the connection it arrives on (``client.Connection``):
    declared here so that the response does not import the client that makes it."""

    transport: asyncio.Transport

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def done(self, response: UpstreamResponse) -> None: ...

    def refuse(self, reason: str) -> None: ...


class UpstreamResponse:
    __slots__ = (
        "_buffer",
        "_buffered",
        "_complete",
        "_conn",
        "_error",
        "_limit",
        "_loop",
        "_max_held",
        "_paused",
        "_received",
        "_receiver",
        "_started",
        "_timer",
        "_total_at",
        "_waiter",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: Carrier, loop: asyncio.AbstractEventLoop, max_held: int = 0) -> None:
        self._conn = conn
        self._loop = loop
        self._started: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._receiver: Callable[[bytes], None] | None = None
        self._complete = False
        self._error: Exception | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._total_at = 0.0
        self._received = 0  # body bytes, decoded
        self._max_held = max_held  # the most an answer read whole may hold; 0: no limit
        self._limit = 0  # the body's limit, once the headers say it is not a stream
        self.status = 0
        self.keep_alive = False
        self.headers: CIMultiDictProxy[str]

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type", "application/octet-stream")
        return value.partition(";")[0].strip().lower()

    @property
    def is_stream(self) -> bool:
        """An SSE stream is relayed as it comes; any other answer is read whole first."""
        return self.content_type == "text/event-stream"

    async def started(self) -> None:
        """Wait for the status line and the headers."""
        await self._started

    def is_eof(self) -> bool:
        """The rest of the body is in: the next read cannot wait."""
        return self._complete or self._error is not None

    async def readany(self) -> bytes:
        """What arrived since the last read, waiting if nothing did; b"" at the end."""
        if not self._buffer and not self._complete and self._error is None:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._buffer:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            if self._paused:
                self._paused = False
                self._conn.resume_reading()
            return data
        if self._error is not None:
            raise self._error
        return b""

    @property
    def reusable(self) -> bool:
        """Read to its end, and both sides keep the connection alive."""
        return self._complete and self.keep_alive and self._error is None

    def pipe(self, receiver: Callable[[bytes], None]) -> None:
        """Hand every piece of the body to ``receiver`` as it arrives, what is already
        kept first. The receiver must not raise: it runs inside the connection's parser."""
        self._receiver = receiver
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            receiver(data)
        if self._paused:
            self._paused = False
            self._conn.resume_reading()

    def hold(self, until: asyncio.Future[None]) -> None:
        """Read no more until ``until`` is done: the client is slower than the upstream."""
        self._conn.pause_reading()
        until.add_done_callback(self._release)

    def _release(self, _: asyncio.Future[None]) -> None:
        if self._receiver is not None:  # not closed meanwhile
            self._conn.resume_reading()

    def close(self) -> None:
        self._receiver = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.done(self)

    def set_deadlines(self, first_byte: float, total: float) -> None:
        """Fail with TimeoutError unless the headers are in within ``first_byte`` seconds
        and the whole answer within ``total``: one timer for both, not one per phase."""
        now = self._loop.time()
        self._total_at = now + total
        self._timer = self._loop.call_at(now + min(first_byte, total), self._expire)

    def _expire(self) -> None:
        if self._started.done() and self._loop.time() < self._total_at:
            self._timer = self._loop.call_at(self._total_at, self._expire)
            return
        self._timer = None
        if not self._complete:
            self.fail(TimeoutError())
            self._conn.transport.close()

    # The connection's side.

    def begin(self, status: int, headers: CIMultiDictProxy[str], keep_alive: bool) -> None:
        self.status, self.headers, self.keep_alive = status, headers, keep_alive
        if self._max_held and not self.is_stream:
            # Set before the first byte of the body, which may be in this very read.
            self._limit = self._max_held
            declared = headers.get("Content-Length", "").strip()
            if declared.isascii() and declared.isdigit() and int(declared) > self._limit:
                self._too_large()  # said up front: not a byte of it is read
                return
        if not self._started.done():
            self._started.set_result(None)

    def body(self, data: bytes) -> None:
        if self._error is not None:  # refused or timed out: the rest of this read is moot
            return
        self._received += len(data)
        if self._limit and self._received > self._limit:
            self._too_large()
            return
        if self._receiver is not None:
            self._receiver(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def end(self) -> None:
        self._complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        self.keep_alive = False
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # nobody may be waiting any more: not "never retrieved"
        self._wake()

    def _too_large(self) -> None:
        """Fail, and drop the connection: an answer read whole must fit in memory."""
        self._conn.refuse(f"the answer exceeded server.max_answer_bytes ({self._limit} bytes)")

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
