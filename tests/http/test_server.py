"""``python -m proxy serve`` as a real process: workers sharing a port, probes, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from proxy.server import FAST_PATH_ENV
from tests.config.test_config import ECHOING, SECRET, SECRET_ENV
from tests.conftest import MakeProxy
from tests.support import (
    ProxyProcess,
    Upstream,
    dead_url,
    eventually,
    free_port,
    routes_yaml,
)

MESSAGES = [{"role": "user", "content": "hi"}]


async def test_workers_share_one_port(tmp_path: Path, wandb: Upstream, prime: Upstream):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = ProxyProcess(path, free_port(), "--workers", "2")
    try:
        await process.wait_listening(workers=2)
        pids = set()
        for _ in range(40):  # a new connection each time: the kernel spreads them
            async with aiohttp.ClientSession() as http:
                async with http.get(process.url + "/healthz") as resp:
                    pids.add((await resp.json())["pid"])
                async with http.post(
                    process.url + "/v1/chat/completions",
                    json={"model": "llama-8b", "messages": MESSAGES},
                ) as resp:
                    assert resp.status == 200
            if len(pids) == 2:
                break
        assert len(pids) == 2
    finally:
        assert process.stop() == 0
    assert process.process.returncode == 0


async def test_sigterm_lets_a_stream_in_flight_finish(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    wandb.fake.stream_script = [b"data: 1\n\n", 0.5, b"data: 2\n\n", 0.5, b"data: [DONE]\n\n"]
    process = ProxyProcess(path, free_port())
    await process.wait_listening()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                process.url + "/v1/chat/completions",
                json={"model": "llama-8b", "messages": MESSAGES, "stream": True},
            ) as resp,
        ):
            assert await resp.content.readany() == b"data: 1\n\n"
            process.signal(signal.SIGTERM)
            assert await resp.read() == b"data: 2\n\ndata: [DONE]\n\n"
        await asyncio.to_thread(process.process.wait, 10)
    finally:
        process.stop()
    assert process.process.returncode == 0


async def test_fast_path_false_leaves_every_call_to_aiohttp(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, monkeypatch: pytest.MonkeyPatch
):
    # aiohttp's server names itself in a Server header; the front sends none
    # (tests/http/test_front.py). With the environment allowing the front, the file decides.
    monkeypatch.setenv(FAST_PATH_ENV, "1")
    call = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
    for fast_path, aiohttp_serves in (("false", True), ("true", False)):
        text = routes_yaml(wandb, prime).replace(
            "server:\n", f"server:\n  fast_path: {fast_path}\n"
        )
        proxy = await make_proxy(text)
        async with proxy.http.post(proxy.url + "/v1/chat/completions", json=call) as resp:
            assert resp.status == 200
            assert ("aiohttp" in resp.headers.get("Server", "")) is aiohttp_serves, resp.headers


async def test_readyz_reports_required_providers(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    dead = Upstream(prime.fake, dead_url("/api/v1"))
    text = routes_yaml(wandb, dead).replace(
        "    headers: {X-Prime-Team-ID: team-42}\n",
        "    headers: {X-Prime-Team-ID: team-42}\n    required: true\n",
    )
    proxy = await make_proxy(text)
    async with proxy.http.get(proxy.url + "/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "not ready"
    assert "provider 'prime': cannot connect" in body["problems"][0]
    async with proxy.http.get(proxy.url + "/healthz") as resp:
        assert resp.status == 200

    ready = await make_proxy(
        routes_yaml(wandb, prime).replace(
            "    headers: {X-Prime-Team-ID: team-42}\n",
            "    headers: {X-Prime-Team-ID: team-42}\n    required: true\n",
        )
    )
    async with ready.http.get(ready.url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"


async def test_serve_refuses_an_invalid_file(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text("providers: {}\nmodels: {}\n")
    process = ProxyProcess(path, free_port())
    code = await asyncio.to_thread(process.process.wait, 30)
    process.stop()
    assert code == 2
    assert "providers: at least one provider is required" in process.log()


async def test_a_refused_start_never_logs_a_value_from_the_environment(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(ECHOING)
    process = ProxyProcess(path, free_port(), env=SECRET_ENV)
    code = await asyncio.to_thread(process.process.wait, 30)
    process.stop()
    assert code == 2
    assert "providers.p.balance: unknown balance '${T_SECRET}'" in process.log()
    assert SECRET not in process.log()


async def test_access_log_is_one_json_line_per_call_across_workers(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = ProxyProcess(path, free_port(), "--workers", "2")
    try:
        await process.wait_listening(workers=2)

        async def call() -> str:
            async with aiohttp.ClientSession() as http:  # new connections: both workers
                payload = {"model": "llama-8b", "messages": MESSAGES}
                async with http.post(process.url + "/v1/chat/completions", json=payload) as resp:
                    assert resp.status == 200
                    return resp.headers["X-Proxy-Request-Id"]

        ids = await asyncio.gather(*(call() for _ in range(60)))
    finally:
        assert process.stop() == 0
    lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
    assert sorted(line["request_id"] for line in lines) == sorted(ids)
    assert {line["status"] for line in lines} == {200}


async def test_access_lines_are_written_while_the_proxy_runs(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    """Lines are gathered to share writes, but none waits for more traffic or for the
    shutdown: a quiet proxy's last call is in the log within a fraction of a second."""
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = ProxyProcess(path, free_port())
    try:
        await process.wait_listening()
        async with aiohttp.ClientSession() as http:
            payload = {"model": "llama-8b", "messages": MESSAGES}
            async with http.post(process.url + "/v1/chat/completions", json=payload) as resp:
                assert resp.status == 200
                request_id = resp.headers["X-Proxy-Request-Id"]
        await eventually(lambda: request_id in process.log(), timeout=2.0)
    finally:
        assert process.stop() == 0


async def test_log_level_warning_turns_the_access_log_off(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = ProxyProcess(path, free_port(), "--log-level", "warning")
    try:
        async with aiohttp.ClientSession() as http:
            await eventually(lambda: _answers(process.port), timeout=20)
            payload = {"model": "llama-8b", "messages": MESSAGES}
            async with http.post(process.url + "/v1/chat/completions", json=payload) as resp:
                assert resp.status == 200
    finally:
        assert process.stop() == 0
    assert "request_id" not in process.log()


def _answers(port: int) -> bool:
    """ "proxy listening" is an INFO line, not printed at warning: ask /healthz instead."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False
