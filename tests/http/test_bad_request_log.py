"""A malformed request is one short log line, with no byte of the client's head in it.

A real proxy process, its stderr read back: the heads below carry a key that must never
reach the log, whatever aiohttp's parser makes of them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.http.bad_requests import LINES_PER_SECOND
from tests.support import ProxyProcess, dead_url, free_port

SECRET = "sk-proxy-SECRET-a1b2c3d4e5f6"
ROUTES = f"""
retry: {{attempts: 1}}
providers:
  p: {{base_url: "{dead_url()}"}}
models:
  m: {{targets: [{{provider: p, model: upstream-m}}]}}
"""
_START = b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
_AUTH = b"Authorization: Bearer " + SECRET.encode()
_END = b"Content-Length: 2\r\n\r\n{}"
MALFORMED = {
    "stray CR": _START + _AUTH + b"\r\r\n" + _END,
    "NUL": _START + _AUTH + b"\x00\r\n" + _END,
    "DEL": _START + _AUTH + b"\x7f\r\n" + _END,
    "bare LF": _START + _AUTH + b"\n" + _END,
    "bare-LF head": (_START + _AUTH + b"\r\n" + _END).replace(b"\r\n", b"\n"),
    "line too long": _START + _AUTH + b"x" * 9000 + b"\r\n" + _END,
    "key in the method": _AUTH.replace(b" ", b"") + b" / HTTP/1.1\r\n\r\n",
    "after a call aiohttp served": b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
    + _START
    + _AUTH
    + b"\x00\r\n"
    + _END,
}


@pytest.fixture
async def proxy_process(tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    # At debug level: aiohttp logs a first request with a bad method at debug only.
    process = ProxyProcess(path, free_port(), "--log-level", "debug")
    try:
        await process.wait_listening()
        yield process
    finally:
        assert process.stop() == 0


async def _send(process: ProxyProcess, raw: bytes) -> bytes:
    """Send ``raw`` on a connection of its own; all that comes back until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    writer.write(raw)
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer


def _bad_request_lines(process: ProxyProcess) -> list[str]:
    """The lines about bad requests: the proxy's, or aiohttp's own first lines."""
    lines = process.log().splitlines()
    return [line for line in lines if "bad request from" in line or "Error handling" in line]


async def test_a_malformed_head_is_one_line_without_the_key(proxy_process: ProxyProcess):
    for raw in MALFORMED.values():
        assert b" 400 Bad Request\r\n" in await _send(proxy_process, raw)
    # aiohttp logs a bad request before it answers it: the lines are all in by now.
    log = proxy_process.log()
    assert SECRET not in log and "Traceback" not in log, log
    assert len(_bad_request_lines(proxy_process)) == len(MALFORMED)
    for line in _bad_request_lines(proxy_process):
        level = "DEBUG" if "BadHttpMethod" in line else "WARNING"  # as aiohttp: scanners
        assert f" {level} proxy.http bad request from 127.0.0.1: " in line, line
        assert len(line) < 200, line
    # The parser's reason is kept, in its own words.
    assert any(
        "Content-Length" in line or "header" in line.lower()
        for line in _bad_request_lines(proxy_process)
    )


async def test_a_flood_of_malformed_heads_is_not_a_flood_of_lines(proxy_process: ProxyProcess):
    flood = 5 * LINES_PER_SECOND
    await asyncio.gather(*(_send(proxy_process, MALFORMED["NUL"]) for _ in range(flood)))
    # Each second lets LINES_PER_SECOND through; the burst spans a second or two.
    assert len(_bad_request_lines(proxy_process)) <= 2 * LINES_PER_SECOND
    # The next line let through says how many were left out.
    async with asyncio.timeout(5):
        while "more bad requests not logged" not in proxy_process.log():
            await _send(proxy_process, MALFORMED["NUL"])
            await asyncio.sleep(0.1)  # a line per 0.1 s: below the limit, not a wait
    assert SECRET not in proxy_process.log()
