"""One proxied call's side of the client connection, whichever server carries it.

The lean front (proxy/http/front.py) serves ordinary calls to the proxied routes; aiohttp
serves everything else, and the same routes when a request is anything but ordinary
(a chunked body, HTTP/1.0, Expect: 100-continue). The pipeline sees only this: the
request's head, its body, and a way to answer with a stream. A whole answer is a
``proxy.answer.Answer`` the carrying server writes; a stream is written as it goes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answer import Answer
from proxy.config.model import ServerSettings
from proxy.errors import RequestTimeout
from proxy.services import Services


class Sink(Protocol):
    """A stream's body on its way to the client, its head already sent."""

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def push(self, data: bytes) -> asyncio.Future[None] | None:
        """Write now, from a callback: None, or a future done once the client's full
        buffer drained. Only where ``can_push``; bytes for a client gone are dropped
        (its call is being cancelled)."""
        ...

    @property
    def can_push(self) -> bool: ...


class Exchange(Protocol):
    @property
    def services(self) -> Services: ...

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...

    async def read_body(self, settings: ServerSettings) -> bytes:
        """At most ``max_body_bytes``, within ``body_timeout``."""
        ...

    async def start_stream(self, status: int, headers: CIMultiDict[str]) -> Sink:
        """Send a stream's head; its body follows through the sink."""
        ...


@dataclass(frozen=True)
class Streamed:
    """What a call answers when its answer was a stream, already written to the client."""

    status: int


# What a call ends with: its whole answer, or the stream it already wrote.
Outcome = Answer | Streamed


def too_large(limit: int) -> str:
    return f"The request body is larger than this proxy accepts ({limit} bytes)."


def body_late(settings: ServerSettings) -> RequestTimeout:
    return RequestTimeout(
        f"The request body did not arrive within {settings.body_timeout:g} seconds."
    )
