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

from aiohttp import web
from prometheus_client import Histogram

from proxy.appkeys import METRICS
from proxy.config import Provider
from proxy.errors import ProxyError
from proxy.exchange import Exchange, Streamed
from proxy.headers import client_headers, name_the_call
from proxy.record import CallRecord
from proxy.sse_tap import SseTap
from proxy.upstream import StreamReads, read_all
from proxy.upstream_response import UpstreamResponse

log = logging.getLogger(__name__)


def is_stream(response: UpstreamResponse) -> bool:
    return response.content_type == "text/event-stream"


async def read_plain(response: UpstreamResponse, provider: Provider) -> web.Response:
    """Read the whole body first, so that a body cut short can still fall back."""
    body = await read_all(response, provider)
    return web.Response(status=response.status, headers=client_headers(response.headers), body=body)


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
    clock = _Clock(record, exchange.app[METRICS].c_chunk_gap.get(provider.name))
    chunk, tail = first, b"\n\n"
    reads = StreamReads(response, provider)
    try:
        while chunk:
            clock.arrived()
            if data := tap.feed(chunk):
                await out.write(data)
                tail = (tail + data)[-4:]
            clock.written()
            chunk = await reads.read()
        if data := tap.finish():
            await out.write(data)
    except ProxyError as exc:
        record.stream_error = exc.message
        log.warning("stream from %s failed after the first byte: %s", provider.name, exc.message)
        held = tap.finish()  # what the client would have had without the proxy's tap
        await out.write(held + _error_event(exc, (tail + held)[-4:]))
    finally:
        reads.close()
        # Also when the client went away: what was streamed until then is billed.
        record.usage = tap.usage
        record.completion_estimate = tap.estimated_completion()
        record.waited += time.perf_counter() - clock.at  # the last read, or a failed one
    await out.end()
    return Streamed(response.status)


class _Clock:
    """Stream timing beside the bytes: first byte, gaps between chunks, and which time
    was the upstream's or the client's (a read, a write) rather than the proxy's."""

    __slots__ = ("at", "gaps", "previous", "record")

    def __init__(self, record: CallRecord, gaps: Histogram) -> None:
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
