"""Many concurrent SSE streams, timed per event by a bare asyncio client.

wrk cannot time the chunks of one response, so this client does: each connection is
an ``asyncio.Protocol`` that stamps the arrival of every SSE event (an event ends at a
blank line). All connections are opened first, so the measure is the streams and not a
burst of TCP handshakes against a listen backlog; then the requests go out evenly over
``spread`` seconds, as calls arrive in life. (Sent all at once, every stream's chunks
would be due at the same instants, and the figure would be how long a burst of 500
chunks takes, not what one chunk's relay adds.)
The client is the same for direct and proxied runs, so its own cost cancels out of the
differences the table reports. A stream counts as complete when every event arrived
and the upstream's numbered tokens ("t1 ", "t2 ", ...) arrived in order, checked on
the raw bytes once the run is over.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import cast

from bench.stats import percentile


class _Probe(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0
        self.events: list[float] = []
        self.tail = b""
        self.last = b""  # the last bytes received, to show when a stream comes back short
        self.raw = bytearray()  # all of them, to check the tokens' order after the run
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.raw += data
        seen = self.tail + data
        self.events.extend([now] * seen.count(b"\n\n"))
        self.tail = seen[-1:]
        self.last = (self.last + data)[-300:]
        # Done once [DONE]'s blank line is in too: the two can come in separate reads,
        # and the stream's last event must be counted before its figures are taken.
        if b"[DONE]\n\n" in self.last and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


@dataclass(frozen=True)
class StreamResult:
    streams: int
    complete: int  # streams that delivered every event, their tokens in order
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    # Gaps that began once every stream was under way: 500 streams at once, without
    # the ramp-up's connections and first requests, which the figures above include.
    steady_gap_p50_ms: float
    steady_gap_p99_ms: float
    seconds: float
    short: tuple[str, ...] = ()  # for each incomplete stream: its events and last bytes


def _request(port: int, key: str | None) -> bytes:
    body = json.dumps(
        {"model": "bench-model", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
    ) % (port, auth, len(body), body)


async def _open(port: int, count: int) -> list[_Probe]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(64)

    async def one() -> _Probe:
        async with gate:
            _, probe = await loop.create_connection(_Probe, "127.0.0.1", port)
            return probe

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def run_streams(
    port: int,
    count: int,
    events: int,
    key: str | None = None,
    spread: float = 1.0,
    limit: float = 120.0,
) -> StreamResult:
    """``events``: data events each stream should deliver (chunks + role + [DONE])."""
    probes = await _open(port, count)
    request = _request(port, key)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    for i, probe in enumerate(probes):
        loop.call_later(spread * i / count, probe.send, request)
    await asyncio.wait_for(asyncio.gather(*(p.done for p in probes)), limit)
    seconds = time.perf_counter() - started
    ttfb = [p.events[0] - p.sent for p in probes if p.events]
    gaps = [b - a for p in probes for a, b in zip(p.events, p.events[1:], strict=False)]
    all_on = max((p.events[0] for p in probes if p.events), default=started)
    steady = [
        b - a for p in probes for a, b in zip(p.events, p.events[1:], strict=False) if a >= all_on
    ]
    for probe in probes:
        if probe.transport is not None:
            probe.transport.close()
    faults = [_fault(p, events) for p in probes]
    return StreamResult(
        streams=count,
        complete=faults.count(None),
        ttfb_p50_ms=percentile(ttfb, 50) * 1000,
        ttfb_p99_ms=percentile(ttfb, 99) * 1000,
        gap_p50_ms=percentile(gaps, 50) * 1000,
        gap_p99_ms=percentile(gaps, 99) * 1000,
        steady_gap_p50_ms=percentile(steady, 50) * 1000,
        steady_gap_p99_ms=percentile(steady, 99) * 1000,
        seconds=seconds,
        short=tuple(fault for fault in faults if fault is not None),
    )


_TOKEN = re.compile(rb'"content":"t(\d+) "')


def _fault(probe: _Probe, events: int) -> str | None:
    """What is wrong with a probe's stream, or None: every event, tokens in order."""
    if len(probe.events) < events:
        return f"{len(probe.events)} events, ending {probe.last!r}"
    tokens = [int(n) for n in _TOKEN.findall(dechunked(bytes(probe.raw)))]
    if tokens != list(range(1, events - 1)):  # less the role chunk and [DONE]
        return f"tokens out of order: {tokens[:12]}..."
    return None


def dechunked(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 answer (the head and the framing removed)."""
    at = raw.find(b"\r\n\r\n") + 4
    parts: list[bytes] = []
    while at < len(raw):
        line_end = raw.find(b"\r\n", at)
        if line_end < 0:
            break
        size = int(raw[at:line_end].split(b";")[0], 16)
        if size == 0:
            break
        parts.append(raw[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2
    return b"".join(parts)
