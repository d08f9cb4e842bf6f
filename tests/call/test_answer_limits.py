"""An upstream answer the proxy holds whole is bounded by ``server.max_answer_bytes``,
decoded: a proxy process against a raw upstream that makes its 600 MiB bodies piece by
piece as the socket takes them, its memory read from /proc (VmHWM: the peak)."""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.load import parse_config
from tests.conftest import MakeProxy
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml
from tests.support.fake_upstream import Fault
from tests.support.metrics import scrape

MiB = 1024 * 1024
LIMIT = 8 * MiB
HUGE = 600 * MiB
# What a call may add to the proxy's peak besides the answer it holds: buffers, the
# parser's reads, the allocator's slack. Measured: 0 to 2 MiB; without the limit, and
# with each failed attempt keeping what it had read, the peak grew by hundreds of MiB.
MARGIN = 8 * MiB
PIECE = b"x" * MiB
OK_BODY = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()


@cache
def gzip_bomb() -> bytes:
    """600 MiB of zeros, gzipped to about 600 KiB, made a MiB at a time."""
    packer = zlib.compressobj(wbits=31)
    zeros = bytes(MiB)
    return b"".join(packer.compress(zeros) for _ in range(HUGE // MiB)) + packer.flush()


def _head(extra: str) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def _pieces(mode: str) -> Iterator[bytes]:
    if mode == "ok":
        yield _head(f"Content-Length: {len(OK_BODY)}\r\n") + OK_BODY
    elif mode == "length":  # the Content-Length says it at once
        yield _head(f"Content-Length: {HUGE}\r\n")
        yield from (PIECE for _ in range(HUGE // MiB))
    elif mode == "chunked":
        yield _head("Transfer-Encoding: chunked\r\n")
        yield from (b"%x\r\n%s\r\n" % (MiB, PIECE) for _ in range(HUGE // MiB))
        yield b"0\r\n\r\n"
    elif mode == "close":  # framed by the close: no length, no chunks
        yield _head("Connection: close\r\n")
        yield from (PIECE for _ in range(HUGE // MiB))
    elif mode == "sse":  # a stream: relayed as it comes, never held, so never limited
        yield b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        yield from (b"data: " + PIECE + b"\n\n" for _ in range(2 * LIMIT // MiB))
    elif mode == "gzip":  # small on the wire, 600 MiB once inflated
        yield _head(f"Content-Encoding: gzip\r\nContent-Length: {len(gzip_bomb())}\r\n")
        bomb = gzip_bomb()
        yield from (bomb[i : i + 64 * 1024] for i in range(0, len(bomb), 64 * 1024))


@dataclass
class LazyUpstream:
    """Answers the n-th request in the n-th mode; ``sent`` has the bytes each answer
    got onto the socket before it ended or the proxy closed the connection."""

    modes: list[str] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                mode = self.modes.pop(0)
                self.sent.append(0)
                for piece in _pieces(mode):
                    writer.write(piece)
                    await writer.drain()
                    self.sent[-1] += len(piece)
                if mode in ("close", "sse"):  # framed by the close
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the proxy closed the connection: how it stops reading an answer
        finally:
            writer.close()


@pytest.fixture
async def lazy() -> AsyncIterator[LazyUpstream]:
    upstream = LazyUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    async with server:
        yield upstream


@pytest.fixture
async def proxy(lazy: LazyUpstream, tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""
server: {{max_answer_bytes: 8MiB}}
retry: {{attempts: 2, base_delay: 10ms, max_delay: 10ms}}
circuit: {{failures: 1000}}
providers:
  raw:
    base_url: http://127.0.0.1:{lazy.port}/v1
    timeouts: {{connect: 5s, first_byte: 10s, idle: 10s, total: 60s}}
models:
  m: {{targets: [{{provider: raw, model: m}}]}}
""")
    process = ProxyProcess(path, free_port())
    await process.wait_listening()
    yield process
    process.stop()


def _access_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    lines = [json.loads(s) for s in proxy.log().splitlines() if s.startswith('{"ts"')]
    return [line for line in lines if line["path"] == "/v1/chat/completions"]


def _status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} in /proc/{pid}/status")


async def _call(http: aiohttp.ClientSession, proxy: ProxyProcess) -> tuple[int, Any]:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("mode", ["length", "chunked", "close", "gzip"])
async def test_an_answer_over_the_limit_is_a_bad_answer_and_memory_stays_bounded(
    proxy: ProxyProcess, lazy: LazyUpstream, mode: str
) -> None:
    gzip_bomb()  # made before the clock of any deadline starts
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        lazy.modes = ["ok"]
        assert (await _call(http, proxy))[0] == 200  # the proxy's own allocations made
        before = _status_kib(proxy.process.pid, "VmRSS")
        lazy.modes = [mode, mode]
        status, body = await _call(http, proxy)
        peak = _status_kib(proxy.process.pid, "VmHWM")
        assert peak - before < LIMIT + MARGIN, f"the peak grew by {(peak - before) / MiB:.0f} MiB"
        assert (status, body["error"]["code"]) == (502, "bad_upstream_response"), body
        assert "exceeded server.max_answer_bytes (8388608 bytes)" in body["error"]["message"]
        # Each attempt's connection was closed long before its end.
        assert len(lazy.sent) == 3 and max(lazy.sent[1:]) < HUGE // 4, lazy.sent
        lazy.modes = [mode, "ok"]  # a retry still gets the next answer
        assert (await _call(http, proxy))[0] == 200
        counted = await scrape(http, proxy.url)
    attempts = "llm_proxy_upstream_attempts_total"
    assert [counted.value(attempts, outcome=o) for o in ("ok", "retried", "failed")] == [2, 2, 1]
    await eventually(lambda: len(_access_lines(proxy)) == 3)
    assert "the answer exceeded server.max_answer_bytes (8388608 bytes); connection dropped" in (
        proxy.log()
    )
    line = _access_lines(proxy)[1]
    assert [(a["outcome"], a["detail"]) for a in line["attempts"]] == [
        ("retried", "bad_upstream_response"),
        ("failed", "bad_upstream_response"),
    ]


async def test_a_stream_over_the_limit_is_relayed_whole(
    proxy: ProxyProcess, lazy: LazyUpstream
) -> None:
    lazy.modes = ["sse"]
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/v1/chat/completions", json=payload) as resp,
    ):
        assert resp.status == 200
        assert len(await resp.read()) == 2 * LIMIT // MiB * (len(PIECE) + 8)


def test_the_limit_is_64_mib_unless_set() -> None:
    text = (
        "providers: {p: {base_url: 'http://127.0.0.1:1/v1'}}\n"
        "models: {m: {targets: [{provider: p, model: m}]}}\n"
    )
    assert parse_config(text, {}).server.max_answer_bytes == 64 * MiB
    assert (
        parse_config("server: {max_answer_bytes: 1KB}\n" + text, {}).server.max_answer_bytes == 1000
    )


async def test_an_answer_over_the_limit_falls_back_to_the_next_target(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # llama-70b: prime first, then wandb. Prime's answer is valid JSON of 2 KiB, over
    # the 1 KiB limit; wandb's ordinary answer is under it.
    text = routes_yaml(wandb, prime).replace("server:\n", "server:\n  max_answer_bytes: 1KiB\n", 1)
    proxy = await make_proxy(text)
    caplog.set_level(logging.INFO, logger="proxy.access")
    big = json.dumps({"choices": [{"message": {"content": "x" * 2048}}]}).encode()
    prime.fake.faults = [Fault(body=big)]
    payload = {"model": "llama-70b", "messages": [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "meta-llama/Llama-3.1-70B-Instruct"  # wandb's
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (1, 1)
    line = json.loads([r for r in caplog.records if r.name == "proxy.access"][-1].getMessage())
    assert [(a["provider"], a["outcome"], a["detail"]) for a in line["attempts"]] == [
        ("prime", "failed", "bad_upstream_response"),
        ("wandb", "ok", "200"),
    ]
    counted = await scrape(proxy.http, proxy.url)
    attempts = "llm_proxy_upstream_attempts_total"
    assert counted.value(attempts, provider="prime", outcome="failed") == 1
    assert counted.value(attempts, provider="wandb", outcome="ok") == 1
