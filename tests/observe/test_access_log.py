"""What the access log says about streams: the time to the first chunk, and a stream
that broke after its first byte."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Proxy
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml

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


@pytest.mark.parametrize("form", ["json", "plain"])
async def test_log_format_json_makes_every_line_json(
    tmp_path: Path, wandb: Upstream, prime: Upstream, form: str
):
    """``--log-format json``: every line the process writes is one JSON object, its own
    records (start-up, a warning) and the access log alike. ``plain`` (the default):
    its records are text lines, and the access log is JSON all the same."""
    path = tmp_path / "routes.yaml"
    # A provider whose key variable is unset: a warning at start.
    unset = "  unkeyed: {base_url: 'http://127.0.0.1:9/v1', api_key: '${LOG_TEST_UNSET}'}\n"
    path.write_text(routes_yaml(wandb, prime).replace("providers:\n", "providers:\n" + unset))
    process = ProxyProcess(path, free_port(), "--log-format", form)
    try:
        await process.wait_listening()
        async with aiohttp.ClientSession() as http:
            body = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(process.url + CHAT, json=body) as resp:
                assert resp.status == 200
    finally:
        assert process.stop() == 0
    lines = process.log().splitlines()
    parsed = [_json(line) for line in lines]
    access = [p for p in parsed if p is not None and p.get("path") == CHAT]
    assert len(access) == 1 and access[0]["status"] == 200
    records = [p for p in parsed if p is not None and "level" in p]
    if form == "plain":
        assert not records
        assert any(" WARNING " in line and "LOG_TEST_UNSET" in line for line in lines)
        return
    assert all(p is not None for p in parsed), [ln for ln in lines if _json(ln) is None]
    warning = next(p for p in records if "LOG_TEST_UNSET" in p["message"])
    assert (warning["level"], warning["logger"]) == ("WARNING", "proxy.config.reload")
    assert any("proxy listening on" in p["message"] for p in records)
    assert all(isinstance(p["ts"], float) and p["pid"] > 0 for p in records)


def _json(line: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None
