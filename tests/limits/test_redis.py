"""Exactness across replicas and through Redis faults, against a private redis-server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MakeProxy
from tests.support import ProxyProcess, Upstream, eventually, free_port, routes_yaml
from tests.support.metrics import scrape
from tests.support.redis_server import Monitor, RedisServer
from tests.support.teams import ADMIN_KEY, RESEARCH_KEY, chat, team_yaml

AUTH = {"Authorization": f"Bearer {RESEARCH_KEY}"}
BODY = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


async def _statuses(url: str, count: int, concurrency: int) -> list[int]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(http: aiohttp.ClientSession) -> int:
        async with (
            semaphore,
            http.post(url + "/v1/chat/completions", json=BODY, headers=AUTH) as resp,
        ):
            await resp.read()
            return resp.status

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        return list(await asyncio.gather(*(one(http) for _ in range(count))))


async def _processes(tmp_path: Path, text: str, count: int) -> list[ProxyProcess]:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    processes = [ProxyProcess(path, free_port()) for _ in range(count)]
    for process in processes:
        await process.wait_listening()
    return processes


async def test_three_replicas_admit_exactly_the_limit(
    tmp_path: Path, wandb: Upstream, prime: Upstream, persistent_redis: RedisServer
):
    text = routes_yaml(wandb, prime) + team_yaml(
        limits="{requests_per_minute: 50, tokens_per_minute: 100000}",
        redis_url=persistent_redis.url,
    )
    processes = await _processes(tmp_path, text, 3)
    try:
        counts = (67, 67, 66)
        results = await asyncio.gather(
            *(_statuses(p.url, n, n) for n, p in zip(counts, processes, strict=True))
        )
    finally:
        for process in processes:
            process.stop()
    statuses = [s for batch in results for s in batch]
    assert not any("redis failed" in p.log() for p in processes)  # no per-process fallback
    assert len(statuses) == 200
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150


@pytest.mark.parametrize("backend", ["redis", "cluster", "sentinel"], indirect=True)
async def test_tokens_admitted_in_a_burst_never_exceed_the_limit(
    tmp_path: Path, wandb: Upstream, prime: Upstream, backend: str
):
    # Each call reserves 7 (prompt estimate) + 20 (max_tokens) = 27 tokens; a burst of 60
    # long calls over 3 replicas, all in flight before any settles, may take at most the
    # bucket (1000) plus what refills while it lasts (1000/60 per second).
    wandb.fake.pause_before_headers = 1.0
    text = routes_yaml(wandb, prime) + team_yaml(
        limits="{tokens_per_minute: 1000}", redis_url=backend
    )
    processes = await _processes(tmp_path, text, 3)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        results = await asyncio.gather(*(_statuses(p.url, 20, 20) for p in processes))
        elapsed = loop.time() - started
    finally:
        for process in processes:
            process.stop()
    admitted = sum(batch.count(200) for batch in results)
    assert not any("redis failed" in p.log() for p in processes)
    assert admitted * 27 <= 1000 + elapsed * 1000 / 60 + 27
    assert admitted >= 1000 // 27  # and the limit is used, not wasted


async def test_at_most_two_redis_round_trips_per_call(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, persistent_redis: RedisServer
):
    limits = "{requests_per_minute: 10000, tokens_per_minute: 10000000, concurrent: 100}"
    proxy = await make_proxy(
        routes_yaml(wandb, prime)
        + team_yaml(
            limits=limits,
            model_limits="{llama-8b: {requests_per_minute: 10000}}",
            redis_url=persistent_redis.url,
        )
    )
    for _ in range(5):  # warm up: connection set-up and script loading
        await chat(proxy)
    before = persistent_redis.command_calls()
    monitor = Monitor(persistent_redis.port)
    for _ in range(50):
        assert (await chat(proxy))[0] == 200
    sent = await monitor.stop()
    after = persistent_redis.command_calls()
    # Every command a client sent is one round trip: one admission, one settlement.
    assert len(sent) <= 2 * 50, Counter(sent)
    assert Counter(sent) == {"evalsha": 100}
    assert after["evalsha"] - before["evalsha"] == 100  # INFO commandstats agrees
    # Each round trip is timed, the settlements (which no answer waits for) too.
    m = await scrape(proxy.http, proxy.url)
    for operation in ("admit", "settle"):
        assert m.value("llm_proxy_redis_latency_seconds_count", operation=operation) == 55


async def test_redis_killed_and_restarted_under_load_loses_and_doubles_nothing(
    tmp_path: Path, wandb: Upstream, prime: Upstream, persistent_redis: RedisServer
):
    text = routes_yaml(wandb, prime) + team_yaml(
        limits="{requests_per_minute: 100000, tokens_per_minute: 100000000}",
        redis_url=persistent_redis.url,
    )
    wandb.fake.pause_before_headers = 0.02
    (process,) = await _processes(tmp_path, text, 1)
    try:
        load = asyncio.create_task(_statuses(process.url, 300, 8))
        await eventually(lambda: len(wandb.fake.seen) >= 50, timeout=20)  # load in flight
        persistent_redis.kill()
        down_at = len(wandb.fake.seen)
        await eventually(lambda: len(wandb.fake.seen) >= down_at + 50, timeout=20)
        assert not load.done()  # calls served while Redis was down, more to come
        await persistent_redis.restart()  # same port, same append-only file
        statuses = await load
        assert statuses == [200] * 300  # fail_open: the outage cost no call
        reported = wandb.fake.reported
        async with asyncio.timeout(10):  # the settlements queued in the outage are written
            while (totals := await _totals(process.url))["requests"] < 300:
                await asyncio.sleep(0.1)
        assert totals["requests"] == 300
        assert totals["prompt_tokens"] == sum(u["prompt_tokens"] for u in reported)
        assert totals["completion_tokens"] == sum(u["completion_tokens"] for u in reported)
    finally:
        process.stop()
    assert "redis failed" in process.log()


async def test_fail_closed_refuses_while_redis_is_down(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, persistent_redis: RedisServer
):
    proxy = await make_proxy(
        routes_yaml(wandb, prime)
        + team_yaml(
            limits="{requests_per_minute: 100}",
            redis_url=persistent_redis.url,
            on_error="fail_closed",
        )
    )
    assert (await chat(proxy))[0] == 200
    persistent_redis.kill()
    status, body, _ = await chat(proxy)
    assert status == 503 and b"rate_limiter_unavailable" in body
    assert len(wandb.fake.seen) == 1
    await persistent_redis.restart()
    assert (await chat(proxy))[0] == 200


async def test_sigterm_flushes_the_queued_ledger(
    tmp_path: Path, wandb: Upstream, prime: Upstream, persistent_redis: RedisServer
):
    text = routes_yaml(wandb, prime) + team_yaml(redis_url=persistent_redis.url)  # ledger only
    (process,) = await _processes(tmp_path, text, 1)
    try:
        persistent_redis.kill()
        assert await _statuses(process.url, 10, 5) == [200] * 10  # booked nowhere yet
        await persistent_redis.restart()
        process.signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.process.wait, 20) == 0
    finally:
        process.stop()
    client = persistent_redis.client()
    try:
        keys = client.keys("llmproxy:{research}:ledger:*")
        requests = sum(int(client.hget(k, "requests") or 0) for k in keys if b"index" not in k)
    finally:
        client.close()
    assert requests == 10


async def _totals(url: str) -> dict[str, int]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            url + "/v1/usage",
            params={"team": "research"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as resp,
    ):
        if resp.status != 200:
            return {"requests": -1}
        totals: dict[str, int] = (await resp.json())["totals"]
        return totals


async def test_settlements_that_cannot_be_written_are_logged_at_shutdown(
    tmp_path: Path, wandb: Upstream, prime: Upstream, persistent_redis: RedisServer
):
    """Redis down for good: each call's settlement is logged as JSON at shutdown, never
    dropped silently, and the errors meanwhile are logged at most once a second."""
    text = routes_yaml(wandb, prime) + team_yaml(redis_url=persistent_redis.url)  # ledger only
    (process,) = await _processes(tmp_path, text, 1)
    try:
        persistent_redis.kill()
        began = time.monotonic()
        assert await _statuses(process.url, 10, 5) == [200] * 10  # fail_open
        took = time.monotonic() - began
        process.signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.process.wait, 20) == 0
    finally:
        process.stop()
    log = process.log()
    lost = [
        json.loads(line.split("ledger write lost at shutdown: ", 1)[1])
        for line in log.splitlines()
        if "ledger write lost at shutdown: " in line
    ]
    assert len(lost) == 10 and len({s["request_id"] for s in lost}) == 10
    assert {(s["team"], s["model"]) for s in lost} == {("research", "llama-8b")}
    assert all(s["completion_tokens"] == 6 for s in lost)  # what the upstream reported
    warnings = log.count("redis failed during")
    assert 1 <= warnings <= 1 + took  # once a second at most, not once a call
