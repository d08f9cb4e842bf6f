"""What the access log says about streams: the time to the first chunk, and a stream
that broke after its first byte."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.support import Upstream, eventually

CHAT = "/v1/chat/completions"
STREAM = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
FIRST = b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\n'


async def _the_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "proxy.access"]

    await eventually(lambda: len(lines()) == 1)
    line: dict[str, Any] = json.loads(lines()[0])
    return line


async def test_ttft_is_the_time_to_the_first_chunk(
    proxy: Proxy, wandb: Upstream, caplog: pytest.LogCaptureFixture
):
    # The upstream sends its headers at once and its first chunk 0.3 s later: the
    # ttft counts to the chunk, and cannot exceed what the client itself waited.
    caplog.set_level(logging.INFO, logger="proxy.access")
    delay = 0.3
    wandb.fake.stream_script = [delay, FIRST, b"data: [DONE]\n\n"]
    began = time.monotonic()
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        assert (await resp.content.readany()).startswith(FIRST)
        waited = time.monotonic() - began
        await resp.read()
    line = await _the_line(caplog)
    assert delay * 1000 <= line["ttft_ms"] <= waited * 1000
    assert line["ttft_ms"] <= line["duration_ms"]
    assert "stream_error" not in line


async def test_a_stream_broken_after_its_first_byte_is_logged_as_such(
    proxy: Proxy, wandb: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy.access")
    wandb.fake.stream_script = [FIRST, 0.05, b"never sent"]
    wandb.fake.cut_stream_after = 2  # the connection is reset after the first chunk
    async with proxy.http.post(proxy.url + CHAT, json=STREAM) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(FIRST) and b'"error"' in body
    line = await _the_line(caplog)
    assert line["status"] == 200  # the status it started with
    assert isinstance(line["stream_error"], str) and line["stream_error"]
    assert line["stream_error"] in body.decode()  # the error event the client got
