"""Rolling restart: SIGTERM one of two proxies sharing a port under load; nothing drops."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import ProxyProcess, Upstream, free_port, routes_yaml

MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.fixture
def migrate_queued_connections() -> Iterator[None]:
    """With SO_REUSEPORT each process has its own accept queue; Linux (5.14+) moves a
    closing listener's queued connections to a sibling only with tcp_migrate_req=1.
    README's operations section tells operators the same."""
    try:
        before = MIGRATE.read_text()
        MIGRATE.write_text("1")
    except OSError as exc:
        pytest.skip(f"cannot enable net.ipv4.tcp_migrate_req here ({exc}); needs root, Linux 5.14+")
    yield
    MIGRATE.write_text(before)


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
                    async with http.post(old.url + "/v1/chat/completions", json={
                            "model": "llama-8b", "stream": stream,
                            "messages": [{"role": "user", "content": "hi"}]}) as resp:  # fmt: skip
                        body = await resp.read()
                        ok = resp.status == 200 and (not stream or body.endswith(b"[DONE]\n\n"))
                        statuses.append(resp.status if ok else -1)

        stop = asyncio.Event()
        clients = [asyncio.create_task(client(stop)) for _ in range(8)]
        await asyncio.sleep(1.0)
        old.signal(signal.SIGTERM)
        assert await asyncio.to_thread(old.process.wait, 20) == 0
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        old.stop()
        new.stop()
    assert len(statuses) > 40
    assert set(statuses) == {200}
    assert "draining" in old.log()
