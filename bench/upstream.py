"""The fake upstream: a bare asyncio HTTP/1.1 server that must never be the bottleneck.

It answers every POST with a fixed chat completion, or, when the body asks for
``"stream": true``, with a paced SSE stream (chunked, keep-alive). No framework: a
protocol that parses just enough HTTP (request line, Content-Length, keep-alive), so
that direct-to-upstream throughput is far above what the proxy can do and every
difference the benchmark shows is the proxy's. Run in its own process:
``python -m bench.upstream --port 9000 --chunks 100 --interval-ms 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import cast

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    },
    separators=(",", ":"),
).encode()

PLAIN_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(COMPLETION)
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    return _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def _framed(data: bytes) -> bytes:
    """One HTTP/1.1 chunk: the stream stays keep-alive, as a real provider's does."""
    return b"%x\r\n%s\r\n" % (len(data), data)


ROLE = _framed(_chunk({"role": "assistant"}))
USAGE = _framed(
    _event(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-model",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 100, "total_tokens": 112},
        }
    )
)
DONE = _framed(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def tokens(count: int) -> tuple[bytes, ...]:
    """The paced chunks, numbered ("t1 ", "t2 ", ...) so that a client can tell that
    every one arrived, in order. Built once per server, not per stream."""
    return tuple(_framed(_chunk({"content": f"t{i} "})) for i in range(1, count + 1))


class Upstream(asyncio.Protocol):
    """One connection: requests in order; a stream holds the connection until it ends."""

    def __init__(self, chunks: tuple[bytes, ...], interval: float) -> None:
        self.chunks, self.interval = chunks, interval
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.streaming = False
        self.sent = 0  # the stream's chunks sent so far
        self.start = 0.0
        self.usage = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming and self._one_request():
            pass

    def _one_request(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.transport is None:
            return False
        head = self.buffer[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end >= 0 else None])
        if len(self.buffer) < end + 4 + length:
            return False
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        if not head.startswith(b"post "):
            self.transport.write(NOT_FOUND)
        elif b'"stream":true' in body.replace(b" ", b""):
            self._stream(b'"include_usage":true' in body.replace(b" ", b""))
        else:
            self.transport.write(PLAIN_HEAD + COMPLETION)
        return True

    def _stream(self, usage: bool) -> None:
        """Paced on a fixed schedule (start + i·interval), so that lateness does not add up."""
        assert self.transport is not None
        self.streaming, self.usage, self.sent = True, usage, 0
        self.transport.write(STREAM_HEAD + ROLE)
        loop = asyncio.get_running_loop()
        self.start = loop.time()
        loop.call_at(self.start + self.interval, self._send)

    def _send(self) -> None:
        """Send every chunk now due, then wait for the next: one timer per stream at a
        time. (A timer per chunk, all set at the start, fired out of order when the
        process stalled while setting them: uvloop reads the clock for each delay before
        it starts the timer, and runs a delay that rounds to 0 ms as a call_soon, after
        the timers of the loop's next turn. A busy upstream reordered about 1 stream in 7,000.)"""
        if self.transport is None or self.transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        due = min(len(self.chunks), int((loop.time() - self.start) / self.interval + 1e-6))
        due = max(due, self.sent + 1)
        data = b"".join(self.chunks[self.sent : due])
        self.sent = due
        if due < len(self.chunks):
            self.transport.write(data)
            loop.call_at(self.start + (due + 1) * self.interval, self._send)
            return
        self.transport.write(data + (USAGE if self.usage else b"") + DONE)
        self.streaming = False
        if self.buffer:
            self.data_received(b"")


async def serve(host: str, port: int, chunks: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    paced = tokens(chunks)
    server = await loop.create_server(
        lambda: Upstream(paced, interval), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        print(f"bench upstream on http://{host}:{port}", flush=True)
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(args.host, args.port, args.chunks, args.interval_ms / 1000))
    else:
        uvloop.run(serve(args.host, args.port, args.chunks, args.interval_ms / 1000))


if __name__ == "__main__":
    main()
