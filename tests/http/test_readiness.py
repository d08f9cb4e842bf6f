"""/readyz needs no key, so its probes of the required providers are shared: a flood of
/readyz calls is not a flood of connections to the providers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from proxy.readiness import PROBE_TTL
from tests.support import ProxyProcess, eventually, free_port


class _Counted(asyncio.Protocol):
    """Accepts a connection, counts it, and closes it: all a TCP probe needs."""

    def __init__(self, accepted: list[int]):
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted[0] += 1
        transport.close()


async def test_a_flood_of_readyz_probes_each_provider_once_a_second(tmp_path: Path):
    accepted = [0]
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(lambda: _Counted(accepted), "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    path = tmp_path / "routes.yaml"
    path.write_text(
        f"providers:\n  p: {{base_url: 'http://127.0.0.1:{port}/v1', required: true}}\n"
        "models:\n  m: {targets: [{provider: p, model: x}]}\n"
    )
    process = ProxyProcess(path, free_port())
    try:
        await process.wait_listening()
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            for _ in range(50):
                async with http.get(process.url + "/readyz") as resp:
                    assert resp.status == 200, await resp.text()
            elapsed = time.monotonic() - started
        await eventually(lambda: accepted[0] >= 1)
        # Probes start at least PROBE_TTL apart, all within the calls' time.
        assert accepted[0] <= 1 + elapsed / PROBE_TTL, (accepted[0], elapsed)
    finally:
        assert process.stop() == 0
        upstream.close()
