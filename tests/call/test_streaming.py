"""Streams are relayed as they arrive, byte for byte, and cancelled with their client."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from tests.conftest import Proxy
from tests.support import Upstream, eventually

CHAT = "/v1/chat/completions"
STREAM = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
# The provider's idle timeout in routes_yaml: without the client's cancellation, the
# proxy would drop the upstream only after this, so "at once" means well before it.
UPSTREAM_IDLE = 2.0

# SSE comments, CRLF separators, an event split across writes, a multi-line data
# field and an event id: what a careless proxy would reframe.
TRICKY = [
    b": keep-alive comment\r\n\r\n",
    b'data: {"choices":[{"index":0,"delta":{"content":"Hel',
    b'lo"}}]}\r\n\r\n',
    b"id: 7\ndata: line one\ndata: line two\n\n",
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n',
    b"\ndata: [DONE]\n\n",
]


async def test_stream_is_byte_identical(proxy: Proxy, wandb: Upstream):
    wandb.fake.stream_script = TRICKY
    wandb.fake.chunk_pause = 0.02  # separate TCP writes on the upstream side
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Accel-Buffering"] == "no"
        received = await resp.read()
    assert received == b"".join(TRICKY)


async def test_each_chunk_is_relayed_before_the_next_exists(proxy: Proxy, wandb: Upstream):
    # The upstream sends one chunk and then waits until the test has read it through
    # the proxy: a proxy that buffered would deadlock here and time out.
    release = asyncio.Event()
    first = b'data: {"choices":[{"index":0,"delta":{"content":"one"}}]}\n\n'
    wandb.fake.stream_script = [first, release, b"data: [DONE]\n\n"]
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        got = b""
        async with asyncio.timeout(2):
            while len(got) < len(first):
                got += await resp.content.readany()
        assert got == first
        release.set()
        assert got + await resp.read() == first + b"data: [DONE]\n\n"


async def test_client_disconnect_mid_stream_closes_upstream(proxy: Proxy, wandb: Upstream):
    wandb.fake.stream_script = [b"data: {}\n\n", 30.0, b"data: [DONE]\n\n"]
    async with aiohttp.ClientSession() as http:
        resp = await http.post(proxy.url + CHAT, json=STREAM)
        assert await resp.content.readany() == b"data: {}\n\n"
        resp.close()  # drop the connection in the middle of the stream
        gone = time.monotonic()
    await eventually(lambda: bool(wandb.fake.cancelled_at), UPSTREAM_IDLE / 2)
    assert wandb.fake.cancelled_at[0] - gone < UPSTREAM_IDLE / 2


async def test_client_disconnect_mid_request_closes_upstream(proxy: Proxy, wandb: Upstream):
    wandb.fake.hang = True  # the upstream never sends headers
    payload = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(http.post(proxy.url + CHAT, json=payload))
        await eventually(lambda: bool(wandb.fake.seen), 2.0)
        task.cancel()
        gone = time.monotonic()
    await eventually(lambda: bool(wandb.fake.cancelled_at), UPSTREAM_IDLE / 2)
    assert wandb.fake.cancelled_at[0] - gone < UPSTREAM_IDLE / 2


async def test_upstream_cut_mid_stream_ends_with_one_error_event(proxy: Proxy, wandb: Upstream):
    first = b'data: {"choices":[{"index":0,"delta":{"content":"par'
    wandb.fake.stream_script = [first, 0.05, b"never sent"]
    wandb.fake.cut_stream_after = 2
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(first)
    tail = body[len(first) :]
    assert tail.startswith(b"\n\ndata: ") and tail.endswith(b"\n\n")
    event = json.loads(tail.strip()[len(b"data: ") :])
    assert event["error"]["type"] == "server_error"
    assert body.count(b'"error"') == 1


async def test_a_stream_that_stalls_ends_with_a_timeout_event(proxy: Proxy, wandb: Upstream):
    """One idle timer per stream (issue 7) still ends a stream whose upstream goes quiet
    for the provider's ``idle`` (2 s here) after the first bytes."""
    first = b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\n'
    wandb.fake.stream_script = [first, 3.0, b"data: late\n\n"]
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(first) and b"late" not in body
    event = json.loads(body[len(first) :].strip()[len(b"data: ") :])
    assert event["error"]["code"] == "upstream_timeout"


async def test_gaps_shorter_than_idle_never_time_out(proxy: Proxy, wandb: Upstream):
    """Each gap (1.2 s) is under ``idle`` (2 s) though together they pass it: the per-stream
    timer must measure each read's wait, not the time since the stream began."""
    chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"%d"}}]}\n\n' % i for i in range(4)]
    wandb.fake.stream_script = [chunks[0], 1.2, chunks[1], 1.2, chunks[2], 1.2, chunks[3]]
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        body = await resp.read()
    assert body == b"".join(chunks)
