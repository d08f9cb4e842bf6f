"""``--workers N`` gives one correct scrape: every worker's counts, merged."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.observe.tally import FLUSH_AFTER
from tests.support import ProxyProcess, Upstream, free_port, routes_yaml
from tests.support.metrics import scrape

MESSAGES = [{"role": "user", "content": "hi"}]
CALLS = 30


async def test_one_scrape_counts_the_calls_of_every_worker(
    tmp_path: Path, wandb: Upstream, prime: Upstream
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime))
    before = _metrics_dirs()
    process = ProxyProcess(path, free_port(), "--workers", "3")
    try:
        await process.wait_listening(workers=3)
        pids = set()
        for _ in range(CALLS):  # a new connection each time: the kernel spreads them
            async with aiohttp.ClientSession() as http:
                payload = {"model": "llama-8b", "messages": MESSAGES}
                async with http.post(process.url + "/v1/chat/completions", json=payload) as resp:
                    assert resp.status == 200
                async with http.get(process.url + "/healthz") as resp:
                    pids.add((await resp.json())["pid"])
        # The worker that serves a scrape adds its own counts first; the others' follow
        # within FLUSH_AFTER: scrape until every call is in (bounded, not a fixed sleep).
        async with aiohttp.ClientSession() as http, asyncio.timeout(5):
            while (m := await scrape(http, process.url)).value("llm_proxy_requests_total") < CALLS:
                await asyncio.sleep(FLUSH_AFTER / 5)
        assert len(pids) >= 2  # the calls really went to several workers
        assert m.value("llm_proxy_requests_total") == CALLS
        assert m.value("llm_proxy_upstream_attempts_total", outcome="ok") == CALLS
        assert m.value("llm_proxy_request_duration_seconds_count") == CALLS
        assert m.value("llm_proxy_requests_in_flight") == 0
        # Other test runs on this machine make such directories too: ours is the one
        # the workers were given.
        ours = {_worker_metrics_dir(pid) for pid in pids}
        assert len(ours) == 1 and ours <= _metrics_dirs() - before, ours
        # A worker that dies takes no counts with it, and its replacement adds to them.
        os.kill(pids.pop(), signal.SIGKILL)
        await process.wait_listening(workers=4)
        async with aiohttp.ClientSession() as http:
            assert (await scrape(http, process.url)).value("llm_proxy_requests_total") == CALLS
    finally:
        assert process.stop() == 0
    assert not any(d.exists() for d in ours)  # removed at exit


def _worker_metrics_dir(pid: int) -> Path:
    """The directory of the metric files a worker has mapped into memory."""
    maps = Path(f"/proc/{pid}/maps").read_text().split()
    dirs = {
        Path(p).parent for p in maps if p.startswith(tempfile.gettempdir() + "/llm-proxy-metrics-")
    }
    [directory] = dirs
    return directory


def _metrics_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("llm-proxy-metrics-*"))


FAKE_ENGINE = Path(__file__).parents[1] / "support" / "fake_engine.py"


async def test_every_scrape_shows_every_worker_s_engines_and_process(
    tmp_path: Path, wandb: Upstream, prime: Upstream
) -> None:
    """Each worker runs its own engine: every scrape, whichever worker answers it, shows
    both workers' engines (state and the engine's own metrics) and both workers' build,
    config and process gauges, each with its ``worker`` label, so no counter seems to
    run backwards from one scrape to the next."""
    engine = f"""
  local:
    engine:
      command: ["{{python}}", "{FAKE_ENGINE}", "--port", "{{port}}"]
      ready: {{timeout: 10s, interval: 50ms}}
      metrics_path: /metrics
"""
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime).replace("providers:\n", "providers:" + engine, 1))
    process = ProxyProcess(path, free_port(), "--workers", "2")
    workers = {"0", "1"}
    try:
        await process.wait_listening(workers=2)

        async def complete() -> bool:
            async with aiohttp.ClientSession() as http:
                m = await scrape(http, process.url)
            seen = {w for w in workers if m.value("fake_engine_calls_total", worker=w) == 42}
            return seen == workers and m.value("llm_proxy_engine_up") == 2

        async with asyncio.timeout(20):
            while not await complete():
                await asyncio.sleep(0.2)
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            async with aiohttp.ClientSession() as http:
                m = await scrape(http, process.url)
            assert m.value("fake_engine_calls_total") == 84  # 42 per worker, never less
            for w in workers:
                assert m.value("fake_engine_calls_total", engine="local", replica="0", worker=w)
                assert m.value("llm_proxy_engine_up", engine="local", worker=w) == 1
                assert m.value("llm_proxy_engine_starts_total", worker=w) == 1
                assert m.value("llm_proxy_build_info", worker=w) == 1
                assert m.value("llm_proxy_process_resident_memory_bytes", worker=w) > 10e6
                assert m.value("llm_proxy_process_cpu_seconds", worker=w) > 0
                assert m.value("llm_proxy_process_open_fds", worker=w) > 3
                started = m.value("llm_proxy_process_start_time_seconds", worker=w)
                loaded = m.value("llm_proxy_config_last_reload_success_timestamp_seconds", worker=w)
                assert started <= loaded <= time.time()
    finally:
        assert process.stop() == 0
