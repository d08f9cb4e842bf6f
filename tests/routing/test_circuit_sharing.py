"""With Redis, every proxy process shares circuit state and elects one probe."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from proxy.routing.circuit import Change, CircuitBreakers
from proxy.routing.circuit_sync import CHANNEL, STATES, CircuitSync
from proxy.services import SERVICES
from tests.conftest import MakeProxy
from tests.routing.test_balance import Replicas, _chat, replica_routes, replicas  # noqa: F401
from tests.support import ProxyProcess, dead_url, eventually, free_port
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_sentinel import RedisSentinels
from tests.support.redis_server import RedisServer
from tests.support.teams import need_redis


async def _calls(url: str, count: int) -> list[int]:
    async def one(http: aiohttp.ClientSession) -> int:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(url + "/v1/chat/completions", json=payload) as resp:
            await resp.read()
            return resp.status

    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(one(http) for _ in range(count))))


@pytest.fixture(params=["node", "cluster", "sentinel"])
def deployment(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, list[RedisServer]]]:
    """A Redis of the test's own, of each kind: its URL for routes.yaml, and its nodes."""
    need_redis()
    (tmp_path / "redis").mkdir()
    if request.param == "node":
        node = RedisServer(tmp_path / "redis")
        yield node.url, [node]
        node.kill()
    elif request.param == "cluster":
        cluster = RedisCluster(tmp_path / "redis")
        yield cluster.url, cluster.nodes
        cluster.stop()
    else:
        sentinels = RedisSentinels(tmp_path / "redis")
        yield sentinels.url, [sentinels.primary, sentinels.replica]
        sentinels.stop()


def _on_every_node(nodes: list[RedisServer], ask: Callable[[redis.Redis], int]) -> int:
    """The sum of ``ask`` over the nodes; a node that refuses (a Cluster's MOVED) adds 0."""
    total = 0
    for node in nodes:
        client = node.client()
        try:
            total += ask(client)
        except redis.RedisError:
            pass
        finally:
            client.close()
    return total


async def _both_subscribed(nodes: list[RedisServer]) -> None:
    def subscribers(client: redis.Redis) -> int:
        return int(dict(client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0))

    for _ in range(200):
        if _on_every_node(nodes, subscribers) == 2:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the proxies never subscribed to circuit changes")


async def _shared(nodes: list[RedisServer], key: str, opened: bool) -> None:
    def held(client: redis.Redis) -> int:
        return int(bool(client.hexists(STATES, key)))

    await eventually(lambda: bool(_on_every_node(nodes, held)) == opened, timeout=5)


async def test_two_processes_share_circuits_and_one_probe(
    tmp_path: Path,
    replicas: Replicas,  # noqa: F811
    deployment: tuple[str, list[RedisServer]],
):
    url, nodes = deployment
    path = tmp_path / "routes.yaml"
    path.write_text(f"""
redis: {{url: "{url}"}}
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
        await _both_subscribed(nodes)
        replicas.a.status = 500
        while len(replicas.a.seen) < 2:  # the first process opens a's circuit
            assert await _calls(first.url, 1) == [200]
        # The opening is shared (its hash entry is written with the PUBLISH), before the
        # second process is called.
        await _shared(nodes, replicas.a_url, opened=True)
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
        await _shared(nodes, replicas.a_url, opened=False)  # the closing reaches the second
        before = len(replicas.a.seen)
        assert await _calls(second.url, 10) == [200] * 10
        assert len(replicas.a.seen) > before  # trusted again everywhere
    finally:
        first.stop()
        second.stop()


async def test_a_circuit_change_that_cannot_be_shared_is_logged_without_userinfo(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Redis refuses the connection (a bound port that never listens): the warning names
    # the endpoint as its metrics label does, never with the password in its URL.
    redis_url = dead_url("").replace("http://", "redis://")
    sync = CircuitSync(redis_url, CircuitBreakers(), timeout=1.0)
    sync.publish(Change("http://user:s3cret-pw@10.0.0.5:8000/v1", 1, 0.0))
    await eventually(lambda: "could not share circuit change" in caplog.text, timeout=5.0)
    await sync.close()
    [message] = [r.getMessage() for r in caplog.records if "could not share" in r.getMessage()]
    # The endpoint, then Redis's error: where it failed.
    assert message.startswith("could not share circuit change of http://10.0.0.5:8000/v1: ")
    assert redis_url.removeprefix("redis://") in message
    assert "s3cret-pw" not in caplog.text


def _redis_routes(replicas: Replicas, redis: RedisServer) -> str:  # noqa: F811
    return f'redis: {{url: "{redis.url}"}}\n' + replica_routes(replicas, "round_robin")


def another_change(key: str, opened: int, until: float) -> str:
    """A circuit change as another proxy process publishes it."""
    return json.dumps({"origin": "another-process", "key": key, "opened": opened, "until": until})


async def test_a_process_started_later_reads_the_open_circuits(
    private_redis: RedisServer,  # first: stopped after the proxy
    make_proxy: MakeProxy,
    replicas: Replicas,  # noqa: F811
):
    # Another process opened a's circuit for a minute before this one started.
    client = private_redis.client()
    client.hset(STATES, replicas.a_url, another_change(replicas.a_url, 1, time.time() + 60))
    client.close()
    proxy = await make_proxy(_redis_routes(replicas, private_redis))
    breakers = proxy.app[SERVICES].breakers
    await eventually(lambda: breakers.state(replicas.a_url) == "open", timeout=5)
    for _ in range(6):
        assert await _chat(proxy) == 200
    assert replicas.counts() == (0, 6)


async def test_closings_published_by_other_processes_are_applied(
    private_redis: RedisServer,  # first: stopped after the proxy
    make_proxy: MakeProxy,
    replicas: Replicas,  # noqa: F811
):
    proxy = await make_proxy(_redis_routes(replicas, private_redis))
    breakers = proxy.app[SERVICES].breakers
    client = private_redis.client()
    try:
        await eventually(lambda: client.pubsub_numsub(CHANNEL)[0][1] == 1, timeout=5)
        client.publish(CHANNEL, another_change(replicas.a_url, 1, time.time() + 60))
        await eventually(lambda: breakers.state(replicas.a_url) == "open", timeout=5)
        for _ in range(4):
            assert await _chat(proxy) == 200
        assert replicas.counts() == (0, 4)
        client.publish(CHANNEL, another_change(replicas.a_url, 0, 0.0))  # its probe succeeded
        await eventually(lambda: breakers.state(replicas.a_url) == "closed", timeout=5)
    finally:
        client.close()
    for _ in range(4):
        assert await _chat(proxy) == 200
    assert replicas.counts() == (2, 6)  # trusted again at once, no probe of its own
