"""The front and aiohttp's server frame every request alike.

The same proxy config served twice: as in production (proxy.server.start_server: the
front first, aiohttp after a hand-over) and by aiohttp's server alone. The same byte
streams, valid pipelined requests mutated the ways a parser can disagree about (header
case, whitespace, odd or duplicate Content-Length, Transfer-Encoding, bare LF, stray CR,
NUL, obs-fold, HTTP/1.0, split at random points across writes) must get the same answers
from both (the same statuses, in the same order) and send the upstream the same bodies;
neither may answer 5xx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.server import Serving, start_server
from proxy.services import SERVICES
from tests.support import Upstream, routes_yaml
from tests.support.raw_http import read_answer

# Tests of the fast path itself (with aiohttp as its reference where they compare).
pytestmark = pytest.mark.front_only

# Short timeouts: a stream whose framing leaves a server waiting is answered quickly.
SETTINGS = "  keepalive_timeout: 2s\n  body_timeout: 1s\n  max_body_bytes: 64KiB\n"
# aiohttp's answer to a request its parser refuses.
REFUSED = "400 refused by the parser"
RESET = "connection reset"
CLOSED = "closed"
# The last request of every stream: one the front serves (no upstream: the model does
# not exist), after which both servers close the connection.
LAST = (
    b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
    b'Content-Length: 29\r\n\r\n{"model": "last", "input": 1}'
)


@dataclass
class Served:
    url: str
    port: int
    runner: web.AppRunner | Serving


@dataclass
class Servers:
    front: Served  # as in production
    plain: Served  # aiohttp's server alone
    upstream: Upstream
    handed_over: list[int]  # the front's hand-overs so far, one item each

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("Servers(...)")  # a failing example's report shows its bytes only


async def _serve_plain(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=app[SERVICES].config.current.server.keepalive_timeout,
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.fixture
async def servers(tmp_path: Path, wandb: Upstream, prime: Upstream) -> AsyncIterator[Servers]:
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime).replace("server:\n", "server:\n" + SETTINGS))
    made = []
    front = await start_server(make_app(ConfigHolder(load_config(path), path)), "127.0.0.1", 0)
    plain = await _serve_plain(make_app(ConfigHolder(load_config(path), path)))
    for runner in (front, plain):
        port = runner.addresses[0][1]
        made.append(Served(f"http://127.0.0.1:{port}", port, runner))
    handed_over: list[int] = []
    assert front.front is not None
    listener = front.front
    server = listener.front.aiohttp_server

    def counting() -> web.RequestHandler:
        handed_over.append(1)
        return server()

    listener.front.aiohttp_server = cast(web.Server, counting)
    yield Servers(made[0], made[1], wandb, handed_over)
    for served in made:
        await served.runner.cleanup()


def _body(model: str, field: str) -> bytes:
    return json.dumps({"model": model, field: "hi"}).encode()


def _valid(path: str, body: bytes, headers: list[tuple[str, str]]) -> list[bytes]:
    """A request as a list of lines (each ending CRLF, the blank one included), then its
    body as the last item."""
    lines = [f"POST {path} HTTP/1.1\r\n".encode(), b"Host: p\r\n"]
    lines += [f"{k}: {v}\r\n".encode() for k, v in headers]
    lines += [f"Content-Length: {len(body)}\r\n".encode(), b"\r\n", body]
    return lines


REQUESTS = st.sampled_from(
    [
        _valid("/v1/chat/completions", _body("same-name", "messages"), []),
        _valid("/v1/chat/completions", _body("no-such-model", "messages"), []),
        _valid("/v1/embeddings", _body("same-name", "input"), []),
        _valid("/v1/completions", _body("same-name", "prompt"), [("X-Note", "a")]),
        _valid("/v1/chat/completions", b"{not json", [("Content-Type", "application/json")]),
        [b"GET /v1/models HTTP/1.1\r\n", b"Host: p\r\n", b"\r\n", b""],
    ]
)

Mutation = Callable[[list[bytes], st.DataObject], list[bytes]]


def _length_index(lines: list[bytes]) -> int | None:
    return next((i for i, ln in enumerate(lines) if ln.lower().startswith(b"content-length")), None)


def _odd_length(lines: list[bytes], data: st.DataObject) -> list[bytes]:
    i = _length_index(lines)
    if i is None:
        return lines
    n = len(lines[-1])
    odd = st.sampled_from(
        [
            f"+{n}",
            f"-{n}",
            f"0{n}",
            f"{n:020d}",
            f"{n},{n}",
            f" {n} ",
            f"\t{n}",
            f"{n} 1",
            f"0x{n:x}",
            "",
            "99999999999",
            f"{max(n - 1, 0)}",
            "\u0663",
        ]
    )
    # Overlong, drawn often: a number of more digits than int() takes, or than 64 bits hold.
    value = data.draw(odd | st.integers(19, 5000).map(lambda digits: "1" * digits))
    return [*lines[:i], f"Content-Length: {value}\r\n".encode(), *lines[i + 1 :]]


def _duplicate_length(lines: list[bytes], data: st.DataObject) -> list[bytes]:
    i = _length_index(lines)
    if i is None:
        return lines
    second = data.draw(st.sampled_from([lines[i], lines[i].lower(), b"Content-Length: 0\r\n"]))
    return [*lines[: i + 1], second, *lines[i + 1 :]]


def _extra_header(lines: list[bytes], data: st.DataObject) -> list[bytes]:
    header = data.draw(
        st.sampled_from(
            [
                b"Transfer-Encoding: chunked\r\n",
                b"Transfer-Encoding: identity\r\n",
                b"Connection: close\r\n",
                b"Connection: keep-alive, Upgrade\r\n",
                b"Expect: 100-continue\r\n",
                b"Host: second\r\n",
                b"X-Folded: a\r\n b\r\n",
                b" X-Leading-Space: a\r\n",
                b"X-Space-Before-Colon : a\r\n",
                b"X-Empty:\r\n",
                b"X-Caf\xc3\xa9: a\r\n",
                b"X-Value: caf\xc3\xa9\r\n",
                b": no-name\r\n",
            ]
        )
    )
    at = data.draw(st.integers(1, len(lines) - 2))  # after the request line, before the blank
    return [*lines[:at], header, *lines[at:]]


def _case(lines: list[bytes], data: st.DataObject) -> list[bytes]:
    i = data.draw(st.integers(1, len(lines) - 3)) if len(lines) > 3 else 1
    name, colon, rest = lines[i].partition(b":")
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    name = bytes(
        c ^ 0x20 if f and chr(c).isalpha() else c for c, f in zip(name, flips, strict=True)
    )
    return [*lines[:i], name + colon + rest, *lines[i + 1 :]]


def _byte(lines: list[bytes], data: st.DataObject) -> list[bytes]:
    """A CRLF of the head made a bare LF or a bare CR, or a stray byte put in a line."""
    i = data.draw(st.integers(0, len(lines) - 2))
    line = lines[i]
    how = data.draw(st.sampled_from(["lf", "cr", "insert"]))
    if how == "lf":
        line = line[:-2] + b"\n"
    elif how == "cr":
        line = line[:-2] + b"\r"
    else:
        at = data.draw(st.integers(0, max(len(line) - 2, 0)))
        stray = data.draw(st.sampled_from([b"\x00", b"\r", b"\n", b"\x7f", b"\x01", b"\xff"]))
        line = line[:at] + stray + line[at:]
    return [*lines[:i], line, *lines[i + 1 :]]


def _version(lines: list[bytes], data: st.DataObject) -> list[bytes]:
    version = data.draw(st.sampled_from([b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"]))
    return [lines[0].replace(b"HTTP/1.1", version), *lines[1:]]


MUTATIONS: list[Mutation] = [_odd_length, _duplicate_length, _extra_header, _case, _byte, _version]


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Up to three pipelined requests, some mutated, then LAST; cut into writes."""
    data = draw(st.data())
    raw = b""
    for _ in range(draw(st.integers(1, 3))):
        lines = draw(REQUESTS)
        for mutate in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
            lines = mutate(lines, data)
        raw += b"".join(lines)
    raw += LAST
    cuts = sorted(draw(st.sets(st.integers(1, len(raw) - 1), max_size=3)))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]


@dataclass
class Exchange:
    statuses: list[int | str]  # of the answers, in order, then how the exchange ended
    announced: bool  # the last answer said Connection: close
    upstream: list[bytes] = field(default_factory=list)  # the bodies the upstream got


async def _exchange(port: int, writes: list[bytes]) -> Exchange:
    """The answers to ``writes``, until the server closes the connection. They are read
    as they come, while the writes go on: a server that closes while the client still
    writes resets the connection, and the answers not read by then are lost."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    done = Exchange([], announced=False)
    reading = asyncio.create_task(_answers(reader, done))
    try:
        for piece in writes:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)  # each piece its own read, on the server's side
    except ConnectionError:
        pass  # the server closed: the answers say why
    try:
        async with asyncio.timeout(5):
            await reading
    except TimeoutError:
        done.statuses.append("no answer, connection open")
    writer.close()
    return done


async def _answers(reader: asyncio.StreamReader, done: Exchange) -> None:
    try:
        while done.statuses[-1:] != [413]:  # the body is never read: the front closes,
            # aiohttp discards it for up to lingering_time (10 s)
            status, headers, _ = await read_answer(reader)
            # The proxy's errors are JSON; aiohttp's, for a request it cannot parse, text.
            refused = status == 400 and headers["content-type"].startswith("text/plain")
            done.statuses.append(REFUSED if refused else status)
            done.announced = headers.get("connection", "").lower() == "close"
        done.statuses.append(CLOSED)
    except asyncio.IncompleteReadError as exc:
        done.statuses.append("partial answer" if exc.partial else CLOSED)
    except ConnectionResetError:
        done.statuses.append(RESET)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(writes=streams())
async def test_the_front_frames_requests_as_aiohttp_does(servers: Servers, writes: list[bytes]):
    handed_over = len(servers.handed_over)
    front = await _settled(servers, servers.front.port, writes)
    event("handed over" if len(servers.handed_over) > handed_over else "front only")
    plain = await _settled(servers, servers.plain.port, writes)
    by_front, by_plain = front.statuses, plain.statuses
    event(f"front's last answer: {by_front[-2] if len(by_front) > 1 else None}")
    raw = b"".join(writes)
    assert not [s for s in by_front + by_plain if isinstance(s, int) and s >= 500], raw
    if by_front == by_plain:
        assert front.upstream == plain.upstream, raw
    else:
        _same_framing_but_for_refusals(front, plain, raw)


async def _settled(servers: Servers, port: int, writes: list[bytes]) -> Exchange:
    """The exchange, and what the upstream got from it. A server that closes while the
    client still writes resets the connection, and a reset can take answers the client
    had not read yet with it: an exchange that ends in a reset is tried again, twice.
    (A server that fails inside its protocol resets every time.)"""
    seen = servers.upstream.fake.seen
    for _ in range(3):
        before = len(seen)
        done = await _exchange(port, writes)
        done.upstream = [s.body for s in seen[before:]]
        if done.statuses[-1] != RESET:
            break
        event("reset, tried again")
    return done


def _same_framing_but_for_refusals(front: Exchange, plain: Exchange, raw: bytes) -> None:
    """When aiohttp's parser refuses bytes (a bad request, or anything after a request
    that closes the connection) read together with requests it parsed, aiohttp's server
    answers only the refusal: those requests go unanswered. Which requests share a read
    differs between the two servers (the front hands over all it has read at once), so
    they may answer a different number of requests before a refusal. Where their answers
    differ, that must be why: they agree as far as both go, and each answered none that
    aiohttp's parser does not frame before the bytes it refuses, then refused those
    bytes, or had answered every request before them and announced that it closes."""
    why = (front, plain, raw)
    framed = _framed_before_refusal(raw)
    for side in (front, plain):
        assert side.statuses[-1] in (CLOSED, RESET), why  # the refusal was read
        answers = side.statuses[:-1]
        if answers and answers[-1] == REFUSED:
            assert len(answers) - 1 <= framed, why
        else:
            assert side.announced and len(answers) == framed, why
    agreed = min(len(front.statuses), len(plain.statuses)) - 2  # neither end nor refusal
    assert front.statuses[:agreed] == plain.statuses[:agreed], why
    fewer, more = sorted((front.upstream, plain.upstream), key=len)
    assert more[: len(fewer)] == fewer, why


def _framed_before_refusal(raw: bytes) -> int:
    """How many requests aiohttp's parser frames in ``raw``, fed a byte at a time (no
    read holds two requests), before it refuses one."""
    loop = asyncio.get_running_loop()
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16)
    framed = 0
    for i in range(len(raw)):
        try:
            messages, _, _ = parser.feed_data(raw[i : i + 1])
        except HttpProcessingError:
            return framed
        framed += len(messages)
    raise AssertionError(f"aiohttp's parser refuses nothing in {raw!r}")
