"""What one connection can make a proxy process hold, on either of its HTTP servers.

A real ``python -m proxy serve`` process, its memory read from /proc: a client that
pipelines requests faster than it reads the answers (or never reads them) must be held
back by the proxy, not buffered, whether the front serves the connection or aiohttp does
(after a hand-over)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.call.auth import key_hash
from tests.support import ProxyProcess, dead_url, free_port

# Tests of the fast path itself (with aiohttp as its reference where they compare).
pytestmark = pytest.mark.front_only

# Calls need a key, so every request below is a cheap 401 that never reaches an upstream.
ROUTES = f"""
server: {{keepalive_timeout: 30s}}
providers:
  p: {{base_url: "{dead_url()}"}}
models:
  m: {{targets: [{{provider: p, model: upstream-m}}]}}
teams:
  t: {{keys: ["{key_hash("sk-proxy-limits-0123456789")}"]}}
"""
UNAUTHORISED = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
    b"Authorization: Bearer not-a-key\r\nContent-Length: 2\r\n\r\n{}"
)
# The first request of a connection decides who serves it: the front takes an ordinary
# POST; a GET goes to aiohttp with every byte after it.
FIRST = {"front": b"", "aiohttp": b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"}
FIRST_STATUS = {"front": [], "aiohttp": [b"200"]}
SEND = 64 * 1024 * 1024
GROWTH = 16 * 1024 * 1024


@pytest.fixture
async def proxy_process(tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES)
    process = ProxyProcess(path, free_port())
    try:
        await process.wait_listening()
        # Warm up (lazy imports, first allocations) before the baseline is read.
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        writer.write(UNAUTHORISED)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 401")
        writer.close()
        yield process
    finally:
        assert process.stop() == 0


def _memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


async def _send(writer: asyncio.StreamWriter, first: bytes, budget: float) -> int:
    """Pipeline 401-bound requests until SEND bytes are out, the proxy stops taking them
    (nothing drains for 2 s), or ``budget`` seconds have passed; the bytes sent."""
    batch = UNAUTHORISED * 1000
    writer.write(first)
    sent, started = len(first), time.monotonic()
    while sent < SEND and time.monotonic() - started < budget:
        writer.write(batch)
        sent += len(batch)
        try:
            await asyncio.wait_for(writer.drain(), 2.0)
        except TimeoutError:
            break  # held back: the proxy has stopped reading this connection
    return sent


async def _still_serves(process: ProxyProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    writer.write(UNAUTHORISED)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 401")
    writer.close()


@pytest.mark.parametrize("server", FIRST)
async def test_a_client_that_never_reads_is_held_back(proxy_process: ProxyProcess, server: str):
    pid = proxy_process.process.pid
    before = _memory(pid, "VmRSS")
    _, writer = await asyncio.open_connection("127.0.0.1", proxy_process.port)
    sent = await _send(writer, FIRST[server], budget=15.0)
    peak = _memory(pid, "VmHWM")
    writer.transport.abort()
    assert peak - before < GROWTH, f"RSS grew by {(peak - before) >> 20} MB"
    assert sent < SEND // 2, f"the proxy took {sent >> 20} MB from a client that reads nothing"
    await _still_serves(proxy_process)


async def _read_slowly(reader: asyncio.StreamReader, answers: list[bytes]) -> None:
    """16 KiB every 20 ms, about 0.8 MB/s: far slower than the requests arrive. The
    pace is the load's shape, not a wait for anything."""
    while data := await reader.read(16 * 1024):
        answers.append(data)
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("server", FIRST)
async def test_a_client_that_reads_slowly_is_held_back(proxy_process: ProxyProcess, server: str):
    pid = proxy_process.process.pid
    before = _memory(pid, "VmRSS")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_process.port)
    answers: list[bytes] = []
    reading = asyncio.create_task(_read_slowly(reader, answers))
    sent = await _send(writer, FIRST[server], budget=5.0)
    peak = _memory(pid, "VmHWM")
    writer.transport.abort()
    await asyncio.gather(reading, return_exceptions=True)
    assert peak - before < GROWTH, f"RSS grew by {(peak - before) >> 20} MB"
    assert sent < SEND // 2, f"the proxy took {sent >> 20} MB from a client reading 0.8 MB/s"
    # The abort can cut the last answer anywhere, even inside its status line, so only
    # whole status lines are read.
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", b"".join(answers))
    assert statuses[: len(FIRST_STATUS[server])] == FIRST_STATUS[server]
    served = statuses[len(FIRST_STATUS[server]) :]
    assert len(served) > 1000  # served all along, in order, at its pace
    assert set(served) == {b"401"}
    await _still_serves(proxy_process)
