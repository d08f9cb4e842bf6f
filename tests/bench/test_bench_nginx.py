"""The bench's compiled reference: nginx, configured by bench/nginx.py, must relay the
fake upstream's streams whole and chunk by chunk, or its figures would not be a proxy's.
A buffering nginx would deliver every event of a stream at once (gaps near zero)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.nginx import start_nginx
from bench.procs import free_port
from bench.streams import run_streams
from bench.upstream import Upstream, tokens

CHUNKS, INTERVAL = 10, 0.02


async def test_nginx_relays_streams_whole_as_they_arrive(tmp_path: Path):
    loop = asyncio.get_running_loop()
    paced = tokens(CHUNKS)
    server = await loop.create_server(lambda: Upstream(paced, INTERVAL), "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    port = free_port()
    nginx = await asyncio.to_thread(start_nginx, upstream_port, port, tmp_path)
    try:
        result = await run_streams(port, 20, CHUNKS + 2, spread=0.05, limit=30)
    finally:
        await asyncio.to_thread(nginx.stop)
        server.close()
    assert (result.complete, result.short) == (20, ())
    assert result.gap_p50_ms > INTERVAL * 1000 / 2  # paced chunks, not one burst
