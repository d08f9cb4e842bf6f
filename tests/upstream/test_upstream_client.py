"""The lean upstream client against raw scripted servers: framing, keep-alive, deadlines.

Each server here is a real TCP server that answers with exactly the bytes a test
scripts, so that the cases aiohttp's client used to handle for us (chunked bodies
with extensions and trailers, bodies framed by the close, interim answers, stale
keep-alive connections) are checked on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import inspect
import ssl
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict

from proxy.upstream.client import UpstreamClient, kept_alive
from proxy.upstream.response import UpstreamConnectionError, UpstreamResponse
from tests.conftest import WANDB_KEY, MakeProxy
from tests.support import eventually
from tests.support.fake_upstream import FakeUpstream

JSON = b'{"ok":true}'
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@dataclass
class Answer:
    data: bytes
    close: bool = False  # close the connection after sending
    delay: float = 0.0  # wait this long before sending
    later: bytes = b""  # sent a moment after ``data``, on its own


@dataclass
class Scripted:
    """Answers the n-th request with the n-th ``Answer``; counts connections."""

    answers: list[Answer]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer.delay and await self._closed_within(reader, answer.delay):
                    return
                writer.write(answer.data)
                await writer.drain()
                if answer.later:
                    await asyncio.sleep(0.05)
                    writer.write(answer.later)
                if answer.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

    async def _closed_within(self, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Wait ``seconds`` before answering, unless the client hangs up first."""
        try:
            if not await asyncio.wait_for(reader.read(1), seconds):
                self.closed_by_client.set()
                return True
        except TimeoutError:
            pass
        return False


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient()
    yield client
    client.close()


async def _serve(*answers: Answer) -> tuple[Scripted, asyncio.Server]:
    scripted = Scripted(list(answers))
    server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.port = server.sockets[0].getsockname()[1]
    return scripted, server


async def _send(
    client: UpstreamClient,
    scripted: Scripted,
    path: str = "/v1/chat/completions",
    deadlines: tuple[float, float] = (2.0, 5.0),
) -> UpstreamResponse:
    """The request sent, its deadlines (first byte, total) set; its headers not awaited."""
    headers = CIMultiDict({"Content-Type": "application/json"})
    response = await client.post(f"http://127.0.0.1:{scripted.port}{path}", headers, b"{}", 2.0)
    response.set_deadlines(*deadlines)
    return response


async def _post(
    client: UpstreamClient, scripted: Scripted, path: str = "/v1/chat/completions"
) -> UpstreamResponse:
    response = await _send(client, scripted, path)
    await response.started()
    return response


async def _body(response: UpstreamResponse) -> bytes:
    parts = []
    try:
        while chunk := await response.readany():
            parts.append(chunk)
    finally:
        response.close()
    return b"".join(parts)


def _plain(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection_and_sends_the_request_exactly(
    client: UpstreamClient,
) -> None:
    scripted, server = await _serve(Answer(_plain(JSON)), Answer(_plain(b"[2]")))
    async with server:
        first = await _post(client, scripted, "/v1/chat/completions?api-version=1")
        assert (first.status, await _body(first)) == (200, JSON)
        second = await _post(client, scripted)
        assert await _body(second) == b"[2]"
    assert scripted.connections == 1
    assert scripted.requests[0] == (
        b"POST /v1/chat/completions?api-version=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        % scripted.port
    )


def test_upstream_connections_are_kept_15_s_by_default() -> None:
    """docs/api.md's figure; the behaviour is shown on a short keep-alive below."""
    assert inspect.signature(UpstreamClient).parameters["keepalive"].default == 15.0


async def test_a_connection_idle_past_the_keepalive_is_closed_not_reused() -> None:
    client = UpstreamClient(keepalive=0.3)
    answers = [Answer(_plain(JSON)), Answer(_plain(b"[2]")), Answer(_plain(b"[3]"))]
    scripted, server = await _serve(*answers)
    try:
        async with server:
            assert await _body(await _post(client, scripted)) == JSON
            assert await _body(await _post(client, scripted)) == b"[2]"
            assert scripted.connections == 1  # reused while fresh
            await asyncio.wait_for(scripted.closed_by_client.wait(), 5)
            assert await _body(await _post(client, scripted)) == b"[3]"
            assert scripted.connections == 2  # a new connection, the stale one closed
    finally:
        client.close()


@pytest.mark.parametrize(
    ("keep_alive", "kept"),
    [
        ("timeout=5, max=100", 4.0),
        ("timeout=1", 0.5),
        ("max=3", 15.0),
        ("timeout=60", 15.0),
        ("timeout=x", 15.0),
    ],
)
def test_the_upstream_s_keep_alive_timeout_shortens_ours(keep_alive: str, kept: float) -> None:
    """A margin under the upstream's own (llama.cpp's server: timeout=5), never above ours."""
    assert kept_alive(keep_alive, 15.0) == kept


async def test_a_connection_is_not_reused_past_the_upstream_s_keep_alive_timeout() -> None:
    """An upstream that says it keeps an idle connection 1 s (llama.cpp's server says 5 s
    and closes it then): after 0.5 s idle, a call takes a new connection rather than race
    the upstream's close. The client's own keep-alive is 15 s."""
    client = UpstreamClient()
    keep = b"Keep-Alive: timeout=1\r\n"
    answers = [Answer(_plain(JSON, keep)), Answer(_plain(b"[2]", keep)), Answer(_plain(b"[3]"))]
    scripted, server = await _serve(*answers)
    try:
        async with server:
            assert await _body(await _post(client, scripted)) == JSON
            assert await _body(await _post(client, scripted)) == b"[2]"
            assert scripted.connections == 1  # reused at once
            await asyncio.wait_for(scripted.closed_by_client.wait(), 5)  # the sweep, at 0.5 s
            assert await _body(await _post(client, scripted)) == b"[3]"
            assert scripted.connections == 2
    finally:
        client.close()


async def test_an_idle_connection_is_closed_at_the_keepalive_without_another_call() -> None:
    client = UpstreamClient(keepalive=0.3)
    scripted, server = await _serve(Answer(_plain(JSON)))
    try:
        async with server:
            assert await _body(await _post(client, scripted)) == JSON
            idle_from = time.monotonic()
            # No call follows: the client's own timer closes the connection.
            await asyncio.wait_for(scripted.closed_by_client.wait(), 5)
            assert time.monotonic() - idle_from >= 0.3
    finally:
        client.close()


async def test_chunked_body_with_extensions_and_trailers_is_decoded(
    client: UpstreamClient,
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n6;ext=1\r\ndata: \r\n5\r\nhello\r\n2\r\n\n\n\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    scripted, server = await _serve(Answer(answer), Answer(_plain(JSON)))
    async with server:
        response = await _post(client, scripted)
        assert response.content_type == "text/event-stream"
        assert await _body(response) == b"data: hello\n\n"
        assert await _body(await _post(client, scripted)) == JSON  # still in step
    assert scripted.connections == 1


async def test_body_framed_by_the_close_is_read_whole_and_the_connection_dropped(
    client: UpstreamClient,
) -> None:
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + JSON
    scripted, server = await _serve(Answer(until_close, close=True), Answer(_plain(b"[2]")))
    async with server:
        assert await _body(await _post(client, scripted)) == JSON
        assert await _body(await _post(client, scripted)) == b"[2]"
    assert scripted.connections == 2


async def test_connection_close_answer_is_not_reused(client: UpstreamClient) -> None:
    closing = _plain(JSON, b"Connection: close\r\n")
    scripted, server = await _serve(Answer(closing, close=True), Answer(_plain(b"[2]")))
    async with server:
        assert await _body(await _post(client, scripted)) == JSON
        assert await _body(await _post(client, scripted)) == b"[2]"
    assert scripted.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    client: UpstreamClient,
) -> None:
    # Keep-alive by its headers, closed a moment later: an idle timeout on the server.
    scripted, server = await _serve(Answer(_plain(JSON), close=True), Answer(_plain(b"[2]")))
    async with server:
        assert await _body(await _post(client, scripted)) == JSON
        await asyncio.sleep(0.2)  # the close reaches the client's pool
        assert await _body(await _post(client, scripted)) == b"[2]"
    assert scripted.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        Answer(_plain(JSON) + b"junk"),
        Answer(_plain(JSON) + _plain(b"[2]")),
        Answer(_plain(JSON), later=b"junk"),
    ],
    ids=["junk-after", "second-answer", "junk-while-idle"],
)
async def test_bytes_outside_an_answer_drop_the_connection_and_are_logged(
    client: UpstreamClient, answer: Answer, caplog: pytest.LogCaptureFixture
) -> None:
    scripted, server = await _serve(answer, Answer(_plain(b"[3]")))
    async with server:
        assert await _body(await _post(client, scripted)) == JSON  # the answer stands
        # The stray bytes reach the client: it says so.
        await eventually(lambda: any(r.levelname == "WARNING" for r in caplog.records))
        assert await _body(await _post(client, scripted)) == b"[3]"
    assert scripted.connections == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"upstream 127.0.0.1:{scripted.port} sent bytes outside an answer "
        f"(in a read of {len(answer.later or answer.data)} bytes); connection dropped"
    ]


async def test_a_gzipped_answer_is_inflated_and_another_encoding_refused(
    client: UpstreamClient,
) -> None:
    packed = gzip.compress(JSON * 100)
    gzipped = _plain(packed, b"Content-Encoding: gzip\r\n")
    brotli = _plain(b"\x1b\x00", b"Content-Encoding: br\r\n")
    scripted, server = await _serve(Answer(gzipped), Answer(brotli))
    async with server:
        assert await _body(await _post(client, scripted)) == JSON * 100
        with pytest.raises(UpstreamConnectionError, match="encoded with 'br'"):
            await _post(client, scripted)


@pytest.mark.parametrize("framing", [b"Content-Length", b"close"])
@pytest.mark.parametrize("wbits", [31, 15], ids=["gzip", "deflate"])
async def test_a_compressed_answer_larger_than_a_read_inflates_whole(
    client: UpstreamClient, framing: bytes, wbits: int
) -> None:
    # Megabytes inflated from one read: more than the reader takes at once, so some of
    # it waits compressed until the reader has taken the rest; the end comes after it.
    text = b"".join(b'{"n": %d, "text": "%s"}\n' % (i, b"ab" * (i % 50)) for i in range(40_000))
    packer = zlib.compressobj(wbits=wbits)
    packed = packer.compress(text) + packer.flush()
    name = b"gzip" if wbits == 31 else b"deflate"
    if framing == b"close":
        head = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\n\r\n" % name
        answer = Answer(head + packed, close=True)
    else:
        answer = Answer(_plain(packed, b"Content-Encoding: %s\r\n" % name))
    scripted, server = await _serve(answer)
    async with server:
        assert await _body(await _post(client, scripted)) == text


async def test_interim_100_continue_is_skipped(client: UpstreamClient) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + _plain(JSON, b"X-Real: yes\r\n")
    scripted, server = await _serve(Answer(answer))
    async with server:
        response = await _post(client, scripted)
        assert response.status == 200
        assert response.headers["X-Real"] == "yes"
        assert await _body(response) == JSON


async def test_body_cut_short_raises_instead_of_ending(client: UpstreamClient) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + JSON
    scripted, server = await _serve(Answer(cut, close=True))
    async with server:
        response = await _post(client, scripted)
        with pytest.raises(UpstreamConnectionError, match="before the end of its body"):
            await _body(response)


async def test_an_answer_that_is_not_http_raises(client: UpstreamClient) -> None:
    scripted, server = await _serve(Answer(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", close=True))
    async with server:
        with pytest.raises(UpstreamConnectionError, match=r"not HTTP/1\.1"):
            await _post(client, scripted)


async def test_no_headers_by_the_first_byte_deadline_raises_timeout(
    client: UpstreamClient,
) -> None:
    scripted, server = await _serve(Answer(_plain(JSON), delay=5.0))
    async with server:
        response = await _send(client, scripted, deadlines=(0.2, 10.0))
        with pytest.raises(TimeoutError):
            await response.started()
        response.close()
        await asyncio.wait_for(scripted.closed_by_client.wait(), 2.0)


async def test_an_answer_still_running_at_the_total_deadline_raises_timeout(
    client: UpstreamClient,
) -> None:
    scripted, server = await _serve(Answer(STREAM_HEAD + b"5\r\ndata:\r\n"))
    async with server:
        response = await _send(client, scripted, deadlines=(2.0, 0.3))
        await response.started()
        assert await response.readany() == b"data:"
        with pytest.raises(TimeoutError):
            await response.readany()
        response.close()


async def test_closing_an_unfinished_answer_drops_the_connection(
    client: UpstreamClient,
) -> None:
    # How a call the client gave up on is cancelled upstream: the upstream sees EOF.
    scripted, server = await _serve(Answer(STREAM_HEAD + b"5\r\ndata:\r\n"))
    async with server:
        response = await _post(client, scripted)
        assert await response.readany() == b"data:"
        response.close()
        await asyncio.wait_for(scripted.closed_by_client.wait(), 2.0)


async def test_a_header_value_with_a_line_break_is_refused(client: UpstreamClient) -> None:
    scripted, server = await _serve(Answer(_plain(JSON)))
    async with server:
        headers = CIMultiDict({"X-Team": "a\r\nX-Injected: 1"})
        with pytest.raises(UpstreamConnectionError, match="line break"):
            await client.post(f"http://127.0.0.1:{scripted.port}/v1", headers, b"{}", 2.0)


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[FakeUpstream, int, Path]]:
    """The fake provider over HTTPS, with a certificate from a throwaway CA (in ca.pem)."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    fake = FakeUpstream(prefix="/v1", key=WANDB_KEY, name="wandb")
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    yield fake, runner.addresses[0][1], tmp_path / "ca.pem"
    await runner.cleanup()


def _tls_routes(port: int) -> str:
    return f"""
retry: {{attempts: 1}}
providers:
  wandb: {{base_url: "https://127.0.0.1:{port}/v1", api_key: "${{TEST_WANDB_KEY}}"}}
models:
  m: {{targets: [{{provider: wandb, model: upstream-m}}]}}
"""


async def test_https_upstream_is_verified_and_called(
    make_proxy: MakeProxy,
    tls_upstream: tuple[FakeUpstream, int, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake, port, ca = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the system's trust store, plus our CA
    proxy = await make_proxy(_tls_routes(port))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with proxy.http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert fake.last.headers["Authorization"] == f"Bearer {WANDB_KEY}"


async def test_https_upstream_with_an_untrusted_certificate_is_refused(
    make_proxy: MakeProxy, tls_upstream: tuple[FakeUpstream, int, Path]
) -> None:
    fake, port, _ = tls_upstream
    proxy = await make_proxy(_tls_routes(port))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 502
        assert "CERTIFICATE_VERIFY_FAILED" in (await resp.json())["error"]["message"]
    assert fake.seen == []


def _raw_routes(port: int) -> str:
    return f"""
retry: {{attempts: 2, base_delay: 10ms, max_delay: 10ms}}
providers:
  raw: {{base_url: "http://127.0.0.1:{port}/v1"}}
models:
  m: {{targets: [{{provider: raw, model: upstream-m}}]}}
"""


def _with_fields(fields: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: %d\r\n\r\n%s" % (len(JSON), JSON)


HEADS = {
    "one 2 MB field": _with_fields(b"X-Big: " + b"a" * 2_000_000 + b"\r\n"),
    "20000 fields": _with_fields(b"".join(b"X-F%d: v\r\n" % i for i in range(20_000))),
    "129 fields": _with_fields(b"".join(b"X-F%d: v\r\n" % i for i in range(128))),
    "70 KB in 100 fields": _with_fields(
        b"".join(b"X-F%02d: %s\r\n" % (i, b"v" * 700) for i in range(100))
    ),
}


@pytest.mark.parametrize("head", list(HEADS))
async def test_an_answer_head_over_the_limits_is_a_bad_answer_and_retried(
    make_proxy: MakeProxy, head: str, caplog: pytest.LogCaptureFixture
) -> None:
    # 64 KiB and 128 fields at most (Content-Length is the 129th field above).
    scripted, server = await _serve(Answer(HEADS[head]), Answer(HEADS[head]), Answer(_plain(JSON)))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with server:
        proxy = await make_proxy(_raw_routes(scripted.port))
        async with proxy.http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
        assert error["code"] == "bad_upstream_response"
        assert "head is larger than 65536 bytes or has more than 128 fields" in error["message"]
        async with proxy.http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
            assert (resp.status, await resp.read()) == (200, JSON)
    assert scripted.connections == 3  # each refused answer's connection was dropped
    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.upstream.client"]
    assert (
        warnings
        == [
            f"upstream 127.0.0.1:{scripted.port}: the answer's head is larger than 65536 bytes "
            "or has more than 128 fields; connection dropped"
        ]
        * 2
    )


async def test_an_answer_head_within_the_limits_is_taken(make_proxy: MakeProxy) -> None:
    # 60 KB: aiohttp's client (the test's) takes no more than 128 fields, so fewer here.
    fields = b"".join(b"X-F%03d: %s\r\n" % (i, b"v" * 600) for i in range(100))
    scripted, server = await _serve(Answer(_with_fields(fields)))
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with server:
        proxy = await make_proxy(_raw_routes(scripted.port))
        async with proxy.http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
            assert (resp.status, await resp.read()) == (200, JSON)
            assert resp.headers["X-F099"] == "v" * 600
