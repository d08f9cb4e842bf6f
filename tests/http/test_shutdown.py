"""Rolling restart: SIGTERM one of two proxies sharing a port under load; nothing drops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.server import Serving
from tests.http.test_front import _request
from tests.support import (
    ProxyProcess,
    Upstream,
    eventually,
    free_port,
    routes_yaml,
    serve_app,
)
from tests.support.raw_http import read_answer

MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.fixture
def migrate_queued_connections() -> Iterator[None]:
    """With SO_REUSEPORT each process has its own accept queue; Linux (5.14+) moves a
    closing listener's queued connections to a sibling only with tcp_migrate_req=1.
    docs/operations.md tells operators the same. The setting is host-wide:
    it is put back as it was, whatever the test does. Under CI (CI=true) a machine
    where it cannot be set fails the test instead of skipping it."""
    try:
        before = MIGRATE.read_text()
        MIGRATE.write_text("1")
    except OSError as exc:
        reason = f"cannot enable net.ipv4.tcp_migrate_req here ({exc}); needs root, Linux 5.14+"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield
    finally:
        MIGRATE.write_text(before)


# The front's, not aiohttp's: aiohttp's server alone resets a connection accepted just
# before the listener closed (seen with PROXY_FAST_PATH=0: ClientOSError mid-restart).
@pytest.mark.front_only
async def test_rolling_restart_drops_nothing(
    tmp_path: Path, wandb: Upstream, prime: Upstream, migrate_queued_connections: None
):
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    wandb.fake.pause_before_headers = 0.2  # calls are in flight when the signal lands
    port = free_port()
    old, new = (ProxyProcess(path, port, "--reuse-port") for _ in range(2))
    statuses: list[int] = []
    try:
        await old.wait_listening()
        await new.wait_listening()

        async def client(stop: asyncio.Event) -> None:
            # A fresh connection per call, as a load balancer in front would open them.
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as http:
                while not stop.is_set():
                    stream = len(statuses) % 2 == 0
                    async with http.post(
                        old.url + "/v1/chat/completions",
                        json={
                            "model": "llama-8b",
                            "stream": stream,
                            "messages": [{"role": "user", "content": "hi"}],
                        },
                    ) as resp:
                        body = await resp.read()
                        ok = resp.status == 200 and (not stream or body.endswith(b"[DONE]\n\n"))
                        statuses.append(resp.status if ok else -1)

        stop = asyncio.Event()
        clients = [asyncio.create_task(client(stop)) for _ in range(8)]
        await eventually(lambda: len(statuses) >= 20, timeout=20)  # the load runs
        old.signal(signal.SIGTERM)
        assert await asyncio.to_thread(old.process.wait, 20) == 0
        after = len(statuses)
        await eventually(lambda: len(statuses) >= after + 20, timeout=20)  # served by new
        stop.set()
        await asyncio.gather(*clients)
    finally:
        old.stop()
        new.stop()
    assert len(statuses) > 40
    assert set(statuses) == {200}
    assert "draining" in old.log()


@pytest.mark.front_only
async def test_a_connection_accepted_before_a_shutdown_gets_its_first_answer(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    """A client whose connection was accepted just before the listener closed is
    sending its first request: it is served, not reset (no client retries a POST that
    way). A connection that sends nothing is closed without holding the shutdown up."""
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    runner, url = await serve_app(make_app(ConfigHolder(load_config(path), path)))
    assert isinstance(runner, Serving) and runner.front is not None
    front = runner.front.front
    host, _, port = url.removeprefix("http://").partition(":")
    (reader, writer), (_, silent) = [
        await asyncio.open_connection(host, int(port)) for _ in range(2)
    ]
    await eventually(lambda: len(front.connections) == 2)
    stopping = asyncio.create_task(runner.cleanup())
    await eventually(lambda: front.closing)
    writer.write(_request("same-name"))
    status, _, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["model"] == "same-name"
    assert await reader.read() == b""  # then closed: the process is going away
    async with asyncio.timeout(3):  # the silent one is not waited for the whole grace
        await stopping
    for w in (writer, silent):
        w.close()
