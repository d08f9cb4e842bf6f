"""The benchmark's streaming row: "streams complete" means every event, tokens in order.

The bench's fake upstream once paced its chunks with a timer each, and a stalled
process fired some out of order; through the proxy that showed as a stream one event
short. These tests hold the bench's upstream and its probe to what the table claims.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from bench.streams import run_streams
from bench.upstream import DONE, ROLE, STREAM_HEAD, Upstream, tokens

CHUNKS = 10
_SWAPPED = list(tokens(CHUNKS))
_SWAPPED[2], _SWAPPED[5] = _SWAPPED[5], _SWAPPED[2]


async def test_upstream_streams_arrive_complete_and_in_order():
    loop = asyncio.get_running_loop()
    paced = tokens(CHUNKS)
    server = await loop.create_server(lambda: Upstream(paced, 0.002), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await run_streams(port, 40, CHUNKS + 2, spread=0.01, limit=30)
    finally:
        server.close()
    assert (result.complete, result.short) == (40, ())


@pytest.mark.parametrize(
    "body, fault",
    [(ROLE + b"".join(_SWAPPED) + DONE, "tokens out of order"), (ROLE + DONE, "2 events")],
    ids=["reordered", "short"],
)
async def test_a_faulty_stream_is_not_complete(body: bytes, fault: str):
    server = await _answering(STREAM_HEAD + body)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await run_streams(port, 1, CHUNKS + 2, spread=0.0, limit=10)
    finally:
        server.close()
    assert result.complete == 0
    assert result.short[0].startswith(fault)


async def _answering(answer: bytes) -> asyncio.Server:
    """A server that answers any request with ``answer`` and keeps the connection open."""

    class Fixed(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.transport.write(answer)

    return await asyncio.get_running_loop().create_server(Fixed, "127.0.0.1", 0)
