"""Relay an upstream response to the client: plain bodies whole, SSE streams chunk by chunk.

A stream is written to the client exactly as its bytes arrive from the upstream
(comments, CRLF separators and events split across reads included), flushed per
chunk. If the upstream fails after the first byte went out, nothing can be retried:
the stream ends with one OpenAI-shaped error event and closes cleanly. Beside the
bytes, the SSE tap reads the usage, and a clock tells upstream time from the proxy's.
"""

from __future__ import annotations

import json
import logging
import time

from proxy.answer import Answer
from proxy.call.exchange import Exchange, Sink, Streamed
from proxy.call.headers import client_headers, name_the_call
from proxy.call.record import CallRecord
from proxy.call.sse import SseTap
from proxy.config.model import Provider
from proxy.errors import ProxyError
from proxy.observe.tally import TalliedHistogram
from proxy.upstream.call import StreamReads, read_all
from proxy.upstream.response import UpstreamResponse

log = logging.getLogger(__name__)


async def read_plain(response: UpstreamResponse, provider: Provider) -> Answer:
    """Read the whole body first, so that a body cut short can still fall back."""
    body = await read_all(response, provider)
    return Answer(response.status, client_headers(response.headers), body)


async def relay_stream(
    exchange: Exchange,
    response: UpstreamResponse,
    provider: Provider,
    record: CallRecord,
    first: bytes,
    tap: SseTap,
) -> Streamed:
    """Relay from ``first`` (already read, so that a dud stream could still fail over)."""
    headers = client_headers(response.headers)
    headers["X-Accel-Buffering"] = "no"
    name_the_call(headers, record)
    out = await exchange.start_stream(response.status, headers)
    clock = _Clock(record, exchange.services.metrics.c_chunk_gap.get(provider.name))
    relay = _Relay(out, tap, clock, response, StreamReads(response, provider))
    try:
        await (relay.piped(first) if out.can_push else relay.pulled(first))
        if data := tap.finish():
            await out.write(data)
    except ProxyError as exc:
        record.stream_error = exc.message
        log.warning("stream from %s failed after the first byte: %s", provider.name, exc.message)
        held = tap.finish()  # what the client would have had without the proxy's tap
        await out.write(held + _error_event(exc, (relay.tail + held)[-4:]))
    finally:
        relay.reads.close()
        # Also when the client went away: what was streamed until then is billed.
        record.usage = tap.usage
        record.completion_estimate = tap.estimated_completion()
        record.waited += time.perf_counter() - clock.at  # the last read, or a failed one
    await out.end()
    return Streamed(response.status)


class _Relay:
    """One stream's chunks on their way through the tap to the client.

    Where the client's connection takes writes from a callback (the front's), the body
    is piped: each chunk is tapped and written from the upstream connection's own
    callback, and the relay's task only waits for the end. Per chunk that saves waking
    the task, a future and a pass through the whole coroutine chain (profiled at 500
    streams: the relay's wake-ups were most of the proxy's cost per chunk). Otherwise
    (aiohttp carries the call) the task reads and awaits each write.
    """

    __slots__ = ("clock", "out", "reads", "response", "tail", "tap")

    def __init__(
        self,
        out: Sink,
        tap: SseTap,
        clock: _Clock,
        response: UpstreamResponse,
        reads: StreamReads,
    ) -> None:
        self.out, self.tap, self.clock = out, tap, clock
        self.response, self.reads = response, reads
        self.tail = b"\n\n"  # the last bytes the client got: where an error event starts

    async def pulled(self, first: bytes) -> None:
        chunk = first
        while chunk:
            if data := self._take(chunk):
                await self.out.write(data)
            self.clock.written()
            chunk = await self.reads.read()

    async def piped(self, first: bytes) -> None:
        self._push(first)
        self.response.pipe(self._push)
        # b"" at the end, an error raised on a failure or an idle timeout; nothing else
        # arrives here once piped, but a chunk that did would still be relayed.
        while chunk := await self.reads.read():
            self._push(chunk)

    def _push(self, chunk: bytes) -> None:
        self.reads.touch()
        if data := self._take(chunk):
            drained = self.out.push(data)
            if drained is not None:  # a slow client: the upstream waits, not our memory
                self.response.hold(drained)
        self.clock.written()

    def _take(self, chunk: bytes) -> bytes:
        """What the client gets of an upstream chunk, now."""
        self.clock.arrived()
        data = self.tap.feed(chunk)
        if data:
            self.tail = (self.tail + data)[-4:]
        return data


class _Clock:
    """Stream timing beside the bytes: first byte, gaps between chunks, and which time
    was the upstream's or the client's (a read, a write) rather than the proxy's."""

    __slots__ = ("at", "gaps", "previous", "record")

    def __init__(self, record: CallRecord, gaps: TalliedHistogram) -> None:
        self.record = record
        self.gaps = gaps
        self.previous: float | None = None
        self.at = time.perf_counter()

    def arrived(self) -> None:
        """A chunk arrived: the time since the last write was spent reading it."""
        now = time.perf_counter()
        self.record.waited += now - self.at
        if self.previous is None:
            self.record.mark_first_byte()
        else:
            self.gaps.observe(now - self.previous)
        self.previous = self.at = now

    def written(self) -> None:
        # A slow client holds the write back; that time is not the proxy's overhead.
        now = time.perf_counter()
        self.record.waited += now - self.at
        self.at = now


def _error_event(exc: ProxyError, tail: bytes) -> bytes:
    # Start on an event boundary even if the upstream stopped in the middle of one.
    sep = b"" if tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) else b"\n\n"
    return sep + b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
