"""One call to one upstream: open it, read it, and map transport errors at one boundary.

The client's exceptions never leave this module: a connection that cannot be made or
breaks becomes ``UpstreamUnreachable`` (502), one whose answer breaks the proxy's limits
(head size, body size) ``BadUpstreamResponse`` (502), a deadline that passes becomes
``UpstreamTimeout`` (504). Timeouts are the provider's: ``connect`` for the TCP/TLS
handshake, ``first_byte`` until the response headers arrive, ``idle`` between two
reads of the body, ``total`` for the whole call.
"""

from __future__ import annotations

import asyncio
import time

from multidict import CIMultiDict

from proxy.config.model import Provider
from proxy.errors import BadUpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from proxy.upstream.client import UpstreamClient
from proxy.upstream.response import AnswerRefused, UpstreamConnectionError, UpstreamResponse


class MappedErrors:
    """``with MappedErrors(provider, phase):`` turns the client's errors into the
    proxy's. A plain class, not @contextmanager: it runs on every read of every body."""

    __slots__ = ("phase", "provider")

    def __init__(self, provider: Provider, phase: str) -> None:
        self.provider, self.phase = provider, phase

    def __enter__(self) -> None:
        pass

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if kind is None:
            return
        if issubclass(kind, TimeoutError):
            said = f": {exc}" if str(exc) else ""  # a connect timeout says what it waited for
            raise UpstreamTimeout(
                f"Provider '{self.provider.name}' did not answer in time ({self.phase}){said}."
            ) from None
        if issubclass(kind, AnswerRefused):
            raise BadUpstreamResponse(
                f"Provider '{self.provider.name}' sent an answer the proxy refuses "
                f"({self.phase}): {exc}"
            ) from None
        if issubclass(kind, (UpstreamConnectionError, OSError)):
            raise UpstreamUnreachable(
                f"Provider '{self.provider.name}' could not be reached ({self.phase}): {exc}"
            ) from None


async def open_call(
    client: UpstreamClient,
    provider: Provider,
    url: str,
    body: bytes,
    headers: CIMultiDict[str],
    max_held: int = 0,
) -> UpstreamResponse:
    """Send the request and return once the response headers are in. An answer that is
    not a stream may hold at most ``max_held`` bytes (0: any), since it is read whole."""
    t = provider.timeouts
    started = time.monotonic()
    with MappedErrors(provider, "waiting for the response headers"):
        response = await client.post(url, headers, body, min(t.connect, t.first_byte), max_held)
        # Connecting counts against first_byte and total too.
        spent = time.monotonic() - started
        response.set_deadlines(t.first_byte - spent, t.total - spent)
        try:
            await response.started()
        except BaseException:
            response.close()
            raise
    return response


async def read_chunk(response: UpstreamResponse, provider: Provider) -> bytes:
    """The next bytes of the body as they arrived, or b"" at its end."""
    with MappedErrors(provider, "reading the response body"):
        # When the rest of the body is already in (all of a small answer; the last read
        # of any body) this read cannot wait, so it needs no idle timer.
        return await read_chunk_timed(response, provider, response.is_eof())


class StreamReads:
    """The reads of one streamed body, with one idle timer per stream, not one per read.

    A read only notes when it started waiting. The timer, when it fires, re-arms itself
    for ``idle`` after that moment, and cancels the reading task only if one read has
    been waiting the whole ``idle``: the same deadline as an ``asyncio.timeout(idle)``
    around every read, for a float per chunk instead of a timer per chunk (at 500
    streams that was a sixth of the proxy's CPU). ``close()`` must follow, always.
    """

    def __init__(self, response: UpstreamResponse, provider: Provider) -> None:
        self._response = response
        self._provider = provider
        self._idle = provider.timeouts.idle
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._waiting_since: float | None = None
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    async def read(self) -> bytes:
        """The next bytes of the body as they arrived, or b"" at its end."""
        response = self._response
        with MappedErrors(self._provider, "reading the response body"):
            if response.is_eof() or self._task is None:
                return await read_chunk_timed(response, self._provider, response.is_eof())
            if self._timer is None:
                self._timer = self._loop.call_at(self._loop.time() + self._idle, self._check)
            cancelling = self._task.cancelling()
            self._waiting_since = self._loop.time()
            try:
                return await response.readany()
            except asyncio.CancelledError:
                if self._expired and self._task.uncancel() <= cancelling:
                    raise TimeoutError from None
                raise
            finally:
                self._waiting_since = None

    def touch(self) -> None:
        """Bytes arrived during a read that lasts a whole piped stream: its idle wait
        starts again."""
        if self._waiting_since is not None:
            self._waiting_since = self._loop.time()

    def _check(self) -> None:
        now, since = self._loop.time(), self._waiting_since
        if since is not None and now - since >= self._idle and self._task is not None:
            self._timer, self._expired = None, True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at((since or now) + self._idle, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def read_chunk_timed(response: UpstreamResponse, provider: Provider, complete: bool) -> bytes:
    """One read under its own idle timer, unless the rest of the body is in (``complete``)."""
    if complete:
        return await response.readany()
    async with asyncio.timeout(provider.timeouts.idle):
        return await response.readany()


async def read_all(response: UpstreamResponse, provider: Provider) -> bytes:
    parts: list[bytes] = []
    try:
        while chunk := await read_chunk(response, provider):
            parts.append(chunk)
    except BaseException:
        # The error's traceback holds this frame, and a failed attempt's error is kept
        # until the call ends: without this, each one would keep what it had read
        # (up to server.max_answer_bytes per attempt).
        parts.clear()
        raise
    return b"".join(parts)
