"""The lean front (proxy/http/front.py) on raw connections: whatever it hands to aiohttp, and
however a client frames, splits or pipelines its requests, every request gets its
answer, in order, on a connection that stays usable."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import pytest

from tests.conftest import MakeProxy, Proxy
from tests.support import Upstream, routes_yaml
from tests.support.raw_http import Answer, read_answer

# Tests of the fast path itself (with aiohttp as its reference where they compare).
pytestmark = pytest.mark.front_only

UPSTREAM_MODEL = {"same-name": "same-name", "llama-8b": "meta-llama/Llama-3.1-8B-Instruct"}


def _request(model: str, *, extra: str = "", version: str = "1.1", stream: bool = False) -> bytes:
    fields = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    body = json.dumps({**fields, "stream": True} if stream else fields)
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: proxy\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n{body}"
    ).encode()


def _model(answer: Answer) -> Any:
    status, _, body = answer
    assert status == 200, body
    return json.loads(body)["model"]


async def _connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = proxy.url.removeprefix("http://").partition(":")
    return await asyncio.open_connection(host, int(port))


async def test_a_connection_moves_to_aiohttp_and_keeps_serving_calls(proxy: Proxy):
    reader, writer = await _connect(proxy)
    writer.write(_request("llama-8b"))
    assert _model(await read_answer(reader)) == "meta-llama/Llama-3.1-8B-Instruct"
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")  # not the front's
    status, _, body = await read_answer(reader)
    assert status == 200 and len(json.loads(body)["data"]) == 3
    for model, upstream_model in UPSTREAM_MODEL.items():  # aiohttp's, on the same socket
        writer.write(_request(model))
        assert _model(await read_answer(reader)) == upstream_model
    writer.close()


async def test_the_front_s_answers_carry_date_but_no_server(proxy: Proxy, wandb: Upstream):
    wandb.fake.extra_headers = {"Server": "upstream/1.0"}  # not passed on either
    reader, writer = await _connect(proxy)
    try:
        for stream in (False, True):
            writer.write(_request("same-name", stream=stream))
            status, headers, _ = await read_answer(reader)
            assert status == 200 and "server" not in headers, headers
            parsed = email.utils.parsedate_to_datetime(headers["date"])
            assert parsed.tzinfo is not None  # an HTTP date, in GMT
            assert abs(parsed.timestamp() - time.time()) < 60
    finally:
        writer.close()


async def test_pipelined_calls_are_answered_in_order(proxy: Proxy):
    reader, writer = await _connect(proxy)
    writer.write(_request("llama-8b") + _request("same-name") + _request("llama-8b"))
    models = [_model(await read_answer(reader)) for _ in range(3)]
    assert models == [
        "meta-llama/Llama-3.1-8B-Instruct",
        "same-name",
        "meta-llama/Llama-3.1-8B-Instruct",
    ]
    writer.close()


async def test_a_head_and_body_split_anywhere_make_the_same_call(proxy: Proxy, wandb: Upstream):
    raw = _request("same-name")
    for cut in (1, 20, raw.index(b"\r\n\r\n") + 2, raw.index(b"\r\n\r\n") + 4, len(raw) - 1):
        reader, writer = await _connect(proxy)
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(raw[cut:])
        assert _model(await read_answer(reader)) == "same-name"
        assert json.loads(wandb.fake.last.body)["messages"][0]["content"] == "hi"
        writer.close()


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("X-Note: caf\u00e9\r\n", 200),  # a value beyond ASCII
        ("Expect: 100-continue\r\n", 100),  # then 200: the body came with the head
        ("Transfer-Encoding: identity\r\n", 400),  # beside Content-Length: ambiguous
        ("X-Folded: a\r\n b\r\n", 400),  # obsolete line folding
        ("Host: second\r\n", 400),  # two Host headers
    ],
)
async def test_requests_the_front_does_not_take_get_aiohttp_s_answer(
    proxy: Proxy, extra: str, status: int
):
    reader, writer = await _connect(proxy)
    writer.write(_request("same-name", extra=extra))
    answer = await read_answer(reader)
    assert answer[0] == status
    if status == 100:
        answer = await read_answer(reader)
    if status != 400:
        assert _model(answer) == "same-name"
    writer.close()


async def test_http_1_0_gets_its_answer_and_the_connection_closes(proxy: Proxy):
    reader, writer = await _connect(proxy)
    writer.write(_request("same-name", version="1.0"))
    assert _model(await read_answer(reader)) == "same-name"
    assert await reader.read() == b""
    writer.close()


async def test_connection_close_is_honoured(proxy: Proxy):
    reader, writer = await _connect(proxy)
    writer.write(_request("same-name", extra="Connection: close\r\n"))
    answer = await read_answer(reader)
    assert _model(answer) == "same-name" and answer[1]["connection"] == "close"
    assert await reader.read() == b""
    writer.close()


async def test_a_body_over_the_limit_is_refused_without_reading_it(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    small = routes_yaml(wandb, prime).replace("server:\n", "server:\n  max_body_bytes: 1KiB\n")
    proxy = await make_proxy(small)
    reader, writer = await _connect(proxy)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n")
    writer.write(b"Content-Length: 50000000\r\n\r\n{")
    status, headers, body = await read_answer(reader)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert await reader.read() == b""  # the rest of that body is never read
    writer.close()


async def test_an_idle_connection_is_closed_after_keepalive_timeout(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    """Two connections answered together; one calls again a second later. Each closes
    keepalive_timeout (2.5 s) after its own last answer: never sooner, and later only by
    the event loop's lag, well under the 1 s allowed here (the timer is rescheduled
    to the exact due time, not a whole keepalive later)."""
    keepalive, later = 2.5, 1.0
    idle = routes_yaml(wandb, prime).replace("server:\n", "server:\n  keepalive_timeout: 2500ms\n")
    proxy = await make_proxy(idle)
    quiet, busy = await _connect(proxy), await _connect(proxy)
    last_answer = {}
    for name, (reader, writer) in (("quiet", quiet), ("busy", busy)):
        writer.write(_request("same-name"))
        assert _model(await read_answer(reader)) == "same-name"
        last_answer[name] = time.monotonic()
    await asyncio.sleep(later)  # the scenario's pause, not a synchronisation
    busy[1].write(_request("same-name"))  # a call resets the idle clock
    assert _model(await read_answer(busy[0])) == "same-name"
    last_answer["busy"] = time.monotonic()

    async def closed_at(reader: asyncio.StreamReader) -> float:
        assert await reader.read() == b""
        return time.monotonic()

    async with asyncio.timeout(3 * keepalive):
        closed = dict(
            zip(
                ("quiet", "busy"),
                await asyncio.gather(closed_at(quiet[0]), closed_at(busy[0])),
                strict=True,
            )
        )
    for name in ("quiet", "busy"):
        idle_for = closed[name] - last_answer[name]
        assert keepalive - 0.05 <= idle_for < keepalive + 1.0, (name, idle_for)
    assert closed["busy"] - closed["quiet"] > later / 2
    for _, writer in (quiet, busy):
        writer.close()


@pytest.mark.parametrize("extra", ["", "X-Note: caf\u00e9\r\n"], ids=["front", "aiohttp"])
async def test_a_client_slower_than_its_stream_gets_every_byte(
    proxy: Proxy, wandb: Upstream, extra: str
):
    # 8 MB of events as fast as the upstream can send them, to a client that reads
    # nothing for a while: the proxy must hold the upstream back, then relay it all,
    # whether the front pipes the stream or aiohttp (a head beyond ASCII) carries it.
    events = [b'data: {"n":%d,"pad":"%s"}\n\n' % (n, b"x" * 4000) for n in range(2000)]
    wandb.fake.stream_script = [*events, b"data: [DONE]\n\n"]
    reader, writer = await _connect(proxy)
    body = json.dumps({"model": "same-name", "stream": True, "messages": []}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: {len(body)}\r\n"
    writer.write(f"{head}{extra}\r\n".encode() + body)
    await asyncio.sleep(1.0)  # every buffer on the way fills up meanwhile
    status, headers, streamed = await read_answer(reader)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert streamed == b"".join(wandb.fake.stream_script)  # type: ignore[arg-type]
    writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\nHost: p\nContent-Length: 2\n\n{}",  # bare LFs
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\nContent-Length: 2\r\n",  # one, unended
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\rContent-Length: 2\r\n",  # a stray CR
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\x00\r\n",  # a NUL, the head unended
    ],
    ids=["bare-lf", "one-bare-lf", "stray-cr", "nul"],
)
async def test_a_head_the_front_never_takes_is_answered_at_once(proxy: Proxy, head: bytes):
    # keepalive_timeout is 75 s: a 400 within 5 s is aiohttp's own, given the head at once.
    reader, writer = await _connect(proxy)
    writer.write(head)
    async with asyncio.timeout(5):
        status, headers, _ = await read_answer(reader)
        assert status == 400
        assert headers["content-type"].startswith("text/plain")  # below the API: not JSON
        assert await reader.read() == b""
    writer.close()


async def test_a_content_length_of_thousands_of_digits_gets_400(proxy: Proxy):
    # int() refuses strings of over 4,300 digits: the front must not try.
    reader, writer = await _connect(proxy)
    length = b"Content-Length: " + b"1" * 5000
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n%b\r\n\r\n{}" % length)
    status, _, body = await read_answer(reader)
    assert status == 400 and b"Content-Length" in body
    assert await reader.read() == b""
    writer.close()


@pytest.mark.parametrize(
    ("digits", "server"), [(18, False), (19, True)], ids=["18-front", "19-aiohttp"]
)
async def test_the_front_takes_a_content_length_of_up_to_18_digits(
    proxy: Proxy, digits: int, server: bool
):
    # Both over max_body_bytes, so both get the same 413; the front's answer is the one
    # without a Server header, aiohttp's has one.
    reader, writer = await _connect(proxy)
    length = b"Content-Length: " + b"9" * digits
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n%b\r\n\r\n{}" % length)
    status, headers, body = await read_answer(reader)
    assert (status, json.loads(body)["error"]["code"]) == (413, "request_too_large")
    assert ("server" in headers) is server, headers
    writer.close()
