"""Traces from real `python -m proxy serve` processes: each worker of `--workers 2`
exports its own spans, told apart by their resource; the standard OTEL_* variables reach
the exporter; and a collector that never answers does not hold a shutdown up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartApp
from tests.support import ProxyProcess, Upstream, free_port, routes_yaml
from tests.support.engines import children
from tests.support.otlp_receiver import SERVER, OtlpReceiver

CHAT = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}

# Which server reads the call does not matter to its trace: the default one.
pytestmark = [pytest.mark.timeout(90), pytest.mark.front_only]


def _config(tmp_path: Path, wandb: Upstream, prime: Upstream, collector: str) -> Path:
    path = tmp_path / "routes.yaml"
    telemetry = f"telemetry: {{otlp_endpoint: '{collector}', service_name: traced}}\n"
    path.write_text(routes_yaml(wandb, prime) + telemetry)
    return path


async def _calls(url: str, n: int) -> None:
    """n calls, each on a connection of its own, so that the kernel spreads them."""
    for _ in range(n):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
            http.post(f"{url}/v1/chat/completions", json=CHAT) as answer,
        ):
            assert answer.status == 200, await answer.text()


async def test_each_worker_exports_its_spans_under_its_own_instance_with_otel_headers(
    start_app: StartApp, wandb: Upstream, prime: Upstream, tmp_path: Path
) -> None:
    receiver = OtlpReceiver()
    collector = await start_app(receiver.app())
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer collector-key",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export while the test waits, not at exit
    }
    config = _config(tmp_path, wandb, prime, collector)
    process = ProxyProcess(config, free_port(), "--workers", "2", env=env)
    try:
        await process.wait_listening(workers=2)
        workers = set(children(process.process.pid))
        await _calls(process.url, 24)
        deadline = time.monotonic() + 20
        while len(receiver.of_kind(SERVER)) < 24 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        assert process.stop() == 0, process.log()
    calls = receiver.of_kind(SERVER)
    assert len(calls) == 24, process.log()
    pids = {span.resource["process.pid"] for span in calls}
    assert pids == workers  # 24 connections: both workers served (2**-23 that one did all)
    by_worker = {(span.resource["proxy.worker"], span.resource["process.pid"]) for span in calls}
    assert {worker for worker, _ in by_worker} == {"0", "1"}
    instances = {span.resource["service.instance.id"] for span in calls}
    assert len(instances) == 2 and all(str(pid) in " ".join(instances) for pid in pids)
    assert set(receiver.authorizations) == {"Bearer collector-key"}


async def test_a_collector_that_never_answers_does_not_hold_the_shutdown(
    wandb: Upstream, prime: Upstream, tmp_path: Path
) -> None:
    """The spans wait for the shutdown's flush (a long batch delay); the collector takes
    the connection and never answers. SIGTERM still ends the process cleanly: the flush
    is given up after 5 s, before the test's stop would resort to SIGKILL (15 s)."""
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    config = _config(tmp_path, wandb, prime, f"http://127.0.0.1:{port}")
    env = {"OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_EXPORTER_OTLP_TIMEOUT": "60"}
    process = ProxyProcess(config, free_port(), env=env)
    try:
        await process.wait_listening()
        await _calls(process.url, 3)
        code = await asyncio.to_thread(process.stop)  # SIGTERM; SIGKILL after 15 s
    finally:
        silent.close()
        for writer in held:
            writer.close()
    assert code == 0, process.log()
    assert "shutdown: gave up flushing the trace spans after 5.0s" in process.log()
    assert held, "the flush reached the collector"
