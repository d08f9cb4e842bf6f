"""A proxy without teams serves anyone with the provider keys: refused on a public address,
at start and on every reload, unless --allow-anonymous."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.call.auth import key_hash
from proxy.config.exposure import loopback
from tests.support import ROOT, ProxyProcess, Upstream, eventually, free_port, routes_yaml

KEY = "sk-proxy-exposure-0123456789"
TEAMS = f'teams:\n  research:\n    keys: ["{key_hash(KEY)}"]\n'
PAYLOAD = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}


async def _chat(http: aiohttp.ClientSession, url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(url + "/v1/chat/completions", json=PAYLOAD, headers=headers) as resp:
        return resp.status


async def test_reload_that_removes_every_team_is_refused_on_a_public_address(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime) + TEAMS)
    # Bound on every interface (a public address), reached through loopback.
    process = ProxyProcess(path, free_port(), "--host", "0.0.0.0")
    try:
        await process.wait_listening()  # teams on 0.0.0.0: accepted at start
        path.write_text(routes_yaml(wandb, prime))
        refused = f"config reload of {path} refused, the running config stays: routes.yaml "
        await eventually(lambda: refused + "configures no team" in process.log(), 20)
        async with aiohttp.ClientSession() as http:
            assert await _chat(http, process.url) == 401
            assert not wandb.fake.seen
            assert await _chat(http, process.url, KEY) == 200  # the old config serves
    finally:
        assert process.stop() == 0


async def test_allow_anonymous_serves_without_teams_on_a_public_address(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = ProxyProcess(path, free_port(), "--host", "0.0.0.0", "--allow-anonymous")
    try:
        await process.wait_listening()
        async with aiohttp.ClientSession() as http:
            assert await _chat(http, process.url) == 200
            # A reload that still has no team is accepted too.
            path.write_text(routes_yaml(wandb, prime, reload_interval="200ms"))
            await eventually(lambda: "config reloaded" in process.log(), 20)
            assert await _chat(http, process.url) == 200
    finally:
        assert process.stop() == 0
    assert "refused" not in process.log()


async def test_a_worker_started_again_does_not_serve_a_file_without_teams(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime) + TEAMS)
    process = ProxyProcess(path, free_port(), "--host", "0.0.0.0", "--workers", "2")
    try:
        await process.wait_listening(workers=2)
        path.write_text(routes_yaml(wandb, prime))
        await eventually(lambda: process.log().count(f"config reload of {path} refused") == 2, 20)
        pid = re.findall(r" (\d+) INFO proxy.server proxy listening on", process.log())[0]
        os.kill(int(pid), signal.SIGKILL)  # the supervisor starts another worker
        await eventually(lambda: f"worker not started, {path} refused: " in process.log(), 20)
        # Each call on a new connection, so that the kernel spreads them over every
        # listening worker.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            assert [await _chat(http, process.url) for _ in range(20)] == [401] * 20
        assert "proxy listening on" not in process.log().split(f"pid {pid} exited")[1]
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.0.2.2", False),
        ("example.com", False),
        ("localhost.evil", False),
        ("evil.localhost.com", False),
    ],
)
def test_what_counts_as_loopback(host: str, expected: bool):
    assert loopback(host) is expected


def _serve(path: Path, host: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
            "--host",
            host,
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("host", ["localhost.evil", "example.com"])
async def test_serve_refuses_no_teams_on_a_name_that_is_not_localhost(
    tmp_path: Path, wandb: Upstream, prime: Upstream, host: str
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = _serve(path, host)
    out, _ = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 2
    # The whole message: what is wrong, and both ways out of it.
    assert (
        f"routes.yaml configures no team, so anyone who reaches {host} could use your "
        "provider keys. Add teams (python -m proxy keygen TEAM --name NAME) or pass "
        "--allow-anonymous.\n"
    ) in out


async def test_serve_takes_localhost_as_loopback(tmp_path: Path, wandb: Upstream, prime: Upstream):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    process = ProxyProcess(path, free_port(), "--host", "localhost")
    try:
        await process.wait_listening()
        async with aiohttp.ClientSession() as http:
            assert await _chat(http, process.url) == 200
    finally:
        assert process.stop() == 0
