"""A lean HTTP/1.1 client for the calls to upstreams: keep-alive pools per origin, one
write per request, llhttp (httptools) for the answer, and nothing else.

Why not aiohttp's client here: per call it builds URL objects, a request and a
response object with cookie, redirect, tracing and decompression machinery the proxy
never uses; profiled under load that was the largest part of the proxy's CPU per call.
This client sends a POST whose URL was split once, and hands the answer over as it
arrives (``UpstreamResponse``): status and headers, then the body read by read.

A connection goes back to its pool only when its answer was read to the end and
both sides allow keep-alive; any other close drops it, which is how a call the client
gave up on is cancelled upstream. Idle connections are kept ``keepalive`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import zlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpResponseParser
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.upstream.inflate import Inflater
from proxy.upstream.response import AnswerRefused, UpstreamConnectionError, UpstreamResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: str


@dataclass(frozen=True)
class Target:
    origin: Origin
    path: str  # with the query, as it goes on the request line


def split_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host_header = parts.netloc.rpartition("@")[2]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(Origin(parts.scheme, parts.hostname, port, host_header), path)


# The proxy asks for identity; these are inflated if an upstream compresses anyway.
_ZLIB_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})
# An answer's head: status line and header fields, 1xx heads included. aiohttp's client
# allows 128 fields of 8190 bytes each, h11 (httpx) 16 KiB for the whole head, and
# nginx as a proxy 4 or 8 KiB (proxy_buffer_size); hosted APIs send about 30 fields.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
_HEAD_TOO_LARGE = (
    f"the answer's head is larger than {MAX_HEAD_BYTES} bytes or has more than {MAX_HEADERS} fields"
)


class UpstreamClient:
    """One per app: the pools of every upstream origin."""

    def __init__(self, keepalive: float = 15.0) -> None:
        self.keepalive = keepalive
        self._idle: dict[Origin, deque[Connection]] = {}
        self._busy: set[Connection] = set()
        self._targets: dict[str, Target] = {}
        self._tls: ssl.SSLContext | None = None
        # One timer for the whole client closes what stayed idle past the keep-alive, so
        # a quiet origin's sockets do not wait for its next call to be closed.
        self._sweeper: asyncio.TimerHandle | None = None

    async def post(
        self,
        url: str,
        headers: CIMultiDict[str],
        body: bytes,
        connect_timeout: float,
        max_held: int = 0,
    ) -> UpstreamResponse:
        """Send the request; the answer's headers are awaited with ``response.started()``.
        An answer other than a stream fails once its body passes ``max_held`` bytes."""
        target = self._target(url)
        head = _head(target, headers, len(body))
        conn = self._pooled(target.origin) or await self._connect(target.origin, connect_timeout)
        self._busy.add(conn)
        return conn.send(head, body, max_held)

    def release(self, conn: Connection) -> None:
        self._busy.discard(conn)
        if conn.transport.is_closing():
            return
        idle = self._idle.setdefault(conn.origin, deque())
        now = time.monotonic()
        conn.idle_since = now
        idle.append(conn)
        while idle and now - idle[0].idle_since > idle[0].keepalive:
            idle.popleft().transport.close()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(conn.keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle past the keep-alive; come back when the oldest
        of the others will be."""
        self._sweeper = None
        now = time.monotonic()
        first_expiry = now + self.keepalive
        for idle in self._idle.values():  # oldest first: release appends, _pooled pops
            while idle and (
                idle[0].transport.is_closing() or now - idle[0].idle_since >= idle[0].keepalive
            ):
                idle.popleft().transport.close()
            if idle:
                first_expiry = min(first_expiry, idle[0].idle_since + idle[0].keepalive)
        if any(self._idle.values()):
            delay = first_expiry - now
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.transport.close()
        self._idle.clear()
        for conn in self._busy:
            conn.transport.close()
        self._busy.clear()

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 4096:  # URLs come from config: bounded, but be sure
                self._targets.clear()
            target = self._targets[url] = split_url(url)
        return target

    def _pooled(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: least likely to be closed
            if not conn.transport.is_closing() and now - conn.idle_since <= conn.keepalive:
                return conn
            conn.transport.close()
        return None

    async def _connect(self, origin: Origin, within: float) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(within):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:  # an OSError too, but a timeout: 504, not 502
            raise TimeoutError(
                f"no connection to {origin.host_header} within {within:g}s"
            ) from None
        except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors too
            # The message names the origin; the caller adds the provider.
            raise UpstreamConnectionError(f"cannot connect to {origin.host_header}: {exc}") from exc
        return conn

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _head(target: Target, headers: CIMultiDict[str], length: int) -> bytes:
    lines = [f"POST {target.path} HTTP/1.1\r\nHost: {target.origin.host_header}\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value:  # a header must not smuggle another one
            raise UpstreamConnectionError(f"header {name} has a line break in its value")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode()


class Connection(asyncio.Protocol):
    """One keep-alive connection, at most one request on it at a time, and its parser:
    one llhttp parser per connection, reset by llhttp itself between answers."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.idle_since = 0.0
        self.keepalive = client.keepalive  # shortened by the upstream's own Keep-Alive
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.response: UpstreamResponse | None = None
        self._loop = asyncio.get_running_loop()
        self._parser = HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._until_close = False  # the answer's body ends when the connection does
        self._inflater: Inflater | None = None
        self._paused = False  # reading paused: the reader has enough for now
        self._head_read = 0  # bytes read while the answer's head was unfinished
        self._head_size = 0  # the sizes of its fields, for a head that came in one read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # create_connection: TCP

    def send(self, head: bytes, body: bytes, max_held: int = 0) -> UpstreamResponse:
        self.response = UpstreamResponse(self, self._loop, max_held)
        self._head_read = self._head_size = 0
        self.transport.write(head + body)
        return self.response

    def done(self, response: UpstreamResponse) -> None:
        """The caller is finished with ``response``: reuse the connection or drop it."""
        if self.response is not response:
            return
        self.response = None
        if not response.reusable:
            self.transport.close()
        self.client.release(self)

    def refuse(self, reason: str) -> None:
        """The answer broke a limit: it fails, the connection goes, and the log says why."""
        log.warning("upstream %s: %s; connection dropped", self.origin.host_header, reason)
        if self.response is not None:
            self.response.fail(AnswerRefused(reason))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # dropped already: the rest is moot
            return
        response = self.response
        if response is None or response.is_eof():  # nothing may come outside an answer
            if response is not None:
                response.keep_alive = False
            self._stray(len(data))
            return
        try:
            self._parser.feed_data(data)
        except HttpParserError as exc:
            if response.is_eof():  # the answer was whole: what followed it is the fault
                self._stray(len(data))
                return
            response.fail(UpstreamConnectionError(f"the answer is not HTTP/1.1: {exc}"))
            self.transport.close()
            return
        if not response.status:  # llhttp holds an unfinished head: it must not grow unbounded
            self._head_read += len(data)
            if self._head_read > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.refuse(_HEAD_TOO_LARGE)

    def _stray(self, size: int) -> None:
        """Bytes outside an answer: the upstream broke HTTP/1.1 (a client that sends one
        request at a time expects nothing else). The answer before them stands, the
        connection goes, and the log says why, since the client cannot tell."""
        log.warning(
            "upstream %s sent bytes outside an answer (in a read of %d bytes); connection dropped",
            self.origin.host_header,
            size,
        )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        response = self.response
        if response is None:
            return
        if exc is None and self._until_close and response.status:
            self._body_ended(response)  # a body framed by the close has just ended
            return
        phase = "its body" if response.status else "its headers"
        reason = f": {exc}" if exc else ""
        response.fail(
            UpstreamConnectionError(f"the connection closed before the end of {phase}{reason}")
        )

    def pause_reading(self) -> None:
        self._paused = True
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._inflater is not None and self.response is not None:
            self._inflate(self.response)  # what waits still compressed comes first
        if not self._paused and not self.transport.is_closing():
            self.transport.resume_reading()

    # llhttp's callbacks, while ``response`` is set (data_received makes sure of it).

    def on_header(self, name: bytes, value: bytes) -> None:
        # A head that came in one read is counted here, field by field.
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if len(self._headers) >= MAX_HEADERS or self._head_size > MAX_HEAD_BYTES:
            if not self.transport.is_closing():
                self.refuse(_HEAD_TOO_LARGE)
            return
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "replace")))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        if self.transport.is_closing():  # refused while its head was read
            return
        if self.response.is_eof():  # a second answer in the read that ended the first
            raise UpstreamConnectionError("an answer that no request asked for")
        status, raw = self._parser.get_status_code(), self._headers
        self._headers = []
        if 100 <= status < 200:  # 100 Continue and the like: the answer follows
            return
        headers = CIMultiDictProxy(CIMultiDict(raw))
        self._until_close = (
            "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
        )
        if "Keep-Alive" in headers:
            self.keepalive = kept_alive(headers["Keep-Alive"], self.client.keepalive)
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        self._inflater = None
        if encoding in _ZLIB_ENCODINGS:
            self._inflater = Inflater()
        elif encoding != "identity":
            self.response.fail(
                UpstreamConnectionError(
                    f"the answer is encoded with {encoding!r}, though the proxy asked for identity"
                )
            )
            self.transport.close()
            return
        self.response.begin(status, headers, self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        if self._inflater is None:
            self.response.body(body)
            return
        self._inflater.feed(body)
        self._inflate(self.response)

    def on_message_complete(self) -> None:
        if self.response is not None and self.response.status:  # not the end of a 1xx
            self._body_ended(self.response)

    def _body_ended(self, response: UpstreamResponse) -> None:
        if self._inflater is None:
            response.end()
            return
        self._inflater.ended = True
        self._inflate(response)

    def _inflate(self, response: UpstreamResponse) -> None:
        """Inflate what waits while the reader takes it (not paused, not failed); end the
        answer once the whole body is out."""
        inflater = self._inflater
        assert inflater is not None
        try:
            for piece in inflater.pieces(lambda: not self._paused and not response.is_eof()):
                response.body(piece)
        except zlib.error as exc:
            response.fail(UpstreamConnectionError(f"the body does not inflate: {exc}"))
            self.transport.close()
            return
        if inflater.finished:
            self._inflater = None
            response.end()


def kept_alive(header: str, ours: float) -> float:
    """How long an idle connection may be reused, given the upstream's ``Keep-Alive:
    timeout=N``: a margin under N, because a request sent as the upstream closes at N
    meets a closed socket (llama.cpp's server closes at 5 s, where ours is 15 s; calls
    failed on that race at once, as unreachable)."""
    for param in header.split(","):
        name, _, value = param.partition("=")
        if name.strip().lower() == "timeout":
            try:
                timeout = float(value.strip())
            except ValueError:
                return ours
            return max(0.0, min(ours, timeout - min(1.0, timeout / 2)))
    return ours
