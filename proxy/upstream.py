"""One call to one upstream: open it, read it, and map transport errors at one boundary.

aiohttp's exceptions never leave this module: a connection that cannot be made or
breaks becomes ``UpstreamUnreachable`` (502), a deadline that passes becomes
``UpstreamTimeout`` (504). Timeouts are the provider's: ``connect`` for the TCP/TLS
handshake, ``first_byte`` until the response headers arrive, ``idle`` between two
reads of the body, ``total`` for the whole call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from multidict import CIMultiDict

from proxy.config import Provider
from proxy.errors import UpstreamTimeout, UpstreamUnreachable


@contextmanager
def map_client_errors(provider: Provider, phase: str) -> Iterator[None]:
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(
            f"Provider '{provider.name}' did not answer in time ({phase})."
        ) from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(
            f"Provider '{provider.name}' could not be reached ({phase}): "
            f"{type(exc).__name__}: {exc}"
        ) from None


async def open_call(
    session: aiohttp.ClientSession,
    provider: Provider,
    url: str,
    body: bytes,
    headers: CIMultiDict[str],
) -> aiohttp.ClientResponse:
    """Send the request and return once the response headers are in."""
    t = provider.timeouts
    timeout = aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect, connect=None)
    with map_client_errors(provider, "waiting for the response headers"):
        async with asyncio.timeout(t.first_byte):
            return await session.post(
                url,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )


async def read_chunk(response: aiohttp.ClientResponse, provider: Provider) -> bytes:
    """The next bytes of the body as they arrived, or b"" at its end."""
    content = response.content
    with map_client_errors(provider, "reading the response body"):
        if content.is_eof():
            # The rest of the body is already in (all of a small answer; the last read
            # of any body), so this read cannot wait: no idle timer needed.
            return await content.readany()
        async with asyncio.timeout(provider.timeouts.idle):
            return await content.readany()


async def read_all(response: aiohttp.ClientResponse, provider: Provider) -> bytes:
    parts: list[bytes] = []
    while chunk := await read_chunk(response, provider):
        parts.append(chunk)
    return b"".join(parts)
