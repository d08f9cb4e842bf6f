"""With Redis, every proxy process shares circuit state and elects one probe."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.circuit import Change, CircuitBreakers
from proxy.circuit_sync import CircuitSync
from tests.redis_server import RedisServer
from tests.support import ProxyProcess, dead_url, eventually, free_port
from tests.teams_setup import need_redis
from tests.test_balance import Replicas, replicas  # noqa: F401  (the fixture)


async def _calls(url: str, count: int) -> list[int]:
    async def one(http: aiohttp.ClientSession) -> int:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(url + "/v1/chat/completions", json=payload) as resp:
            await resp.read()
            return resp.status

    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(one(http) for _ in range(count))))


async def _both_subscribed(redis: RedisServer) -> None:
    client = redis.client()
    try:
        for _ in range(200):
            if dict(client.pubsub_numsub("llmproxy:circuit")).get(b"llmproxy:circuit") == 2:
                return
            await asyncio.sleep(0.02)
    finally:
        client.close()
    raise AssertionError("the proxies never subscribed to circuit changes")


async def test_two_processes_share_circuits_and_one_probe(
    tmp_path: Path,
    replicas: Replicas,  # noqa: F811
):
    need_redis()
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    path = tmp_path / "routes.yaml"
    path.write_text(f"""
redis: {{url: "{redis.url}"}}
retry: {{attempts: 2, base_delay: 10ms, max_delay: 10ms}}
providers:
  engine:
    endpoints: [{replicas.a_url}, {replicas.b_url}]
    circuit: {{failures: 2, cooldown: 1s, max_cooldown: 8s}}
models:
  m: {{targets: [{{provider: engine, model: smol}}]}}
""")
    first, second = ProxyProcess(path, free_port()), ProxyProcess(path, free_port())
    try:
        await first.wait_listening()
        await second.wait_listening()
        await _both_subscribed(redis)
        replicas.a.status = 500
        while len(replicas.a.seen) < 2:  # the first process opens a's circuit
            assert await _calls(first.url, 1) == [200]
        await asyncio.sleep(0.3)  # the opening reaches the second process
        seen = len(replicas.a.seen)
        assert await _calls(second.url, 10) == [200] * 10
        assert len(replicas.a.seen) == seen  # the second process kept away from a too
        await asyncio.sleep(1.1)  # cool-down over; a still fails
        results = await asyncio.gather(_calls(first.url, 10), _calls(second.url, 10))
        assert [s for batch in results for s in batch] == [200] * 20
        assert len(replicas.a.seen) == seen + 1  # one probe for the whole deployment
        replicas.a.status = 200
        await asyncio.sleep(2.2)  # the failed probe doubled the cool-down to 2 s
        await _calls(first.url, 4)
        await asyncio.sleep(0.3)  # the closing reaches the second process
        before = len(replicas.a.seen)
        assert await _calls(second.url, 10) == [200] * 10
        assert len(replicas.a.seen) > before  # trusted again everywhere
    finally:
        first.stop()
        second.stop()
        redis.kill()


async def test_a_circuit_change_that_cannot_be_shared_is_logged_without_userinfo(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis refuses the connection (a bound port that never listens): the warning names
    # the endpoint as its metrics label does, never with the password in its URL.
    redis_url = dead_url("").replace("http://", "redis://")
    redis = aioredis.Redis.from_url(redis_url)
    sync = CircuitSync(redis_url, redis, CircuitBreakers(), timeout=1.0)
    sync.publish(Change("http://user:s3cret-pw@10.0.0.5:8000/v1", 1, 0.0))
    await eventually(lambda: "could not share circuit change" in caplog.text, timeout=5.0)
    await redis.aclose()
    assert "http://10.0.0.5:8000/v1" in caplog.text
    assert "s3cret-pw" not in caplog.text
