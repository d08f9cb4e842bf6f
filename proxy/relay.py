"""Relay an upstream response to the client: plain bodies whole, SSE streams chunk by chunk.

A stream is written to the client exactly as its bytes arrive from the upstream
(comments, CRLF separators and events split across reads included), flushed per
chunk. If the upstream fails after the first byte went out, nothing can be retried:
the stream ends with one OpenAI-shaped error event and closes cleanly.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque

import aiohttp
from aiohttp import web
from prometheus_client import Histogram

from proxy.appkeys import METRICS
from proxy.config import Provider
from proxy.errors import ProxyError
from proxy.headers import client_headers
from proxy.record import CallRecord
from proxy.upstream import read_all, read_chunk
from proxy.usage import Usage, find_usage

log = logging.getLogger(__name__)

# The usage event comes last but one (before [DONE]); a few chunks cover split reads.
_USAGE_CHUNKS = 3


def is_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


async def read_plain(response: aiohttp.ClientResponse, provider: Provider) -> web.Response:
    """Read the whole body first, so that a body cut short can still fall back."""
    body = await read_all(response, provider)
    return web.Response(status=response.status, headers=client_headers(response.headers), body=body)


async def relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
    provider: Provider,
    record: CallRecord,
) -> web.StreamResponse:
    out = web.StreamResponse(status=response.status, headers=client_headers(response.headers))
    out.headers["X-Accel-Buffering"] = "no"
    await out.prepare(request)
    tap = _Tap(record, request.app[METRICS].c_chunk_gap.get(provider.name))
    tail = b"\n\n"
    try:
        while True:
            asked = time.perf_counter()
            chunk = await read_chunk(response, provider)
            tap.arrived(chunk, asked)
            if not chunk:
                break
            await out.write(chunk)
            tap.written()
            tail = (tail + chunk)[-4:]
    except ProxyError as exc:
        tap.arrived(b"", asked)  # an idle timeout is the upstream's time, not overhead
        record.stream_error = exc.message
        log.warning("stream from %s failed after the first byte: %s", provider.name, exc.message)
        await out.write(_error_event(exc, tail))
    record.usage = tap.usage()
    await out.write_eof()
    return out


class _Tap:
    """Watches a stream beside its bytes: timing, and its last chunks for the usage."""

    def __init__(self, record: CallRecord, gaps: Histogram) -> None:
        self.record = record
        self.gaps = gaps
        self.previous: float | None = None
        self.at = 0.0
        self.recent: deque[bytes] = deque(maxlen=_USAGE_CHUNKS)

    def arrived(self, chunk: bytes, asked: float) -> None:
        self.at = time.perf_counter()
        self.record.waited += self.at - asked
        if not chunk:
            return
        if self.previous is None:
            self.record.mark_first_byte()
        else:
            self.gaps.observe(self.at - self.previous)
        self.previous = self.at
        self.recent.append(chunk)

    def written(self) -> None:
        # A slow client holds the write back; that time is not the proxy's overhead.
        self.record.waited += time.perf_counter() - self.at

    def usage(self) -> Usage | None:
        return find_usage(b"".join(self.recent)) if self.recent else None


def _error_event(exc: ProxyError, tail: bytes) -> bytes:
    # Start on an event boundary even if the upstream stopped in the middle of one.
    sep = b"" if tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) else b"\n\n"
    return sep + b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
