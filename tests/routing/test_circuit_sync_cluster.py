"""Circuit sharing on a Redis Cluster: a change one process publishes reaches another
subscribed on another node, one probe is elected for the deployment, the open
circuits are read by a process starting later, and a follower whose node is killed
subscribes again on a node that is alive."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator

import pytest

from proxy.routing import circuit_sync
from proxy.routing.circuit import Change, CircuitBreakers
from proxy.routing.circuit_sync import CHANNEL, STATES, CircuitSync
from tests.routing.test_circuit_sharing import another_change
from tests.support import eventually
from tests.support.redis_cluster import RedisCluster

KEY = "http://10.0.0.5:8000/v1"
OTHER = "http://10.0.0.6:8000/v1"


@pytest.fixture
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(circuit_sync, "_RETRY", 0.1)


@contextlib.asynccontextmanager
async def _following(*syncs: CircuitSync) -> AsyncIterator[None]:
    followers = [asyncio.ensure_future(sync.follow()) for sync in syncs]
    try:
        yield
    finally:
        for follower in followers:
            follower.cancel()
        await asyncio.wait(followers, timeout=5)
        for sync in syncs:
            await sync.close()


async def test_a_change_reaches_the_other_processes_from_any_node(
    redis_cluster: RedisCluster, quick_retry: None
) -> None:
    first_breakers, second_breakers = CircuitBreakers(), CircuitBreakers()
    first = CircuitSync(redis_cluster.nodes[0].url, first_breakers, 2.0)
    second = CircuitSync(redis_cluster.nodes[1].url, second_breakers, 2.0)
    async with _following(first, second):
        await asyncio.sleep(0.5)  # both subscribed
        first.publish(Change(KEY, 1, time.time() + 60))
        await eventually(lambda: second_breakers.state(KEY) == "open", 5)
        # Published on a primary other than the one the second listens on: the
        # cluster bus carries it there.
        listening = (await second.redis.subscribe_address()).port
        other = next(n for n in redis_cluster.primaries() if n.port != listening)
        client = other.client()
        try:
            client.publish(CHANNEL, another_change(OTHER, 1, time.time() + 60))
        finally:
            client.close()
        await eventually(lambda: second_breakers.state(OTHER) == "open", 5)
        # One probe for the deployment: the claim is one key, on its slot's owner (with
        # the openings: KEY's is current, so nobody may probe it yet).
        probed = "http://10.0.0.9:8000/v1"
        assert await first.claim_probe(probed, 60.0) is True
        assert await second.claim_probe(probed, 60.0) is False
        assert await second.claim_probe(KEY, 60.0) is False


async def test_a_process_starting_later_reads_the_open_circuits(
    redis_cluster: RedisCluster,
) -> None:
    keys = [f"http://10.0.0.{n}:8000/v1" for n in range(1, 5)]
    client = redis_cluster.client()
    try:
        for key in keys:
            client.hset(STATES, key, another_change(key, 1, time.time() + 60))
    finally:
        client.close()
    breakers = CircuitBreakers()
    async with _following(CircuitSync(redis_cluster.urls()[2], breakers, 2.0)):
        await eventually(lambda: [breakers.state(k) for k in keys] == ["open"] * 4, 5)


async def test_a_follower_whose_node_dies_listens_on_another(
    redis_cluster: RedisCluster, quick_retry: None
) -> None:
    breakers = CircuitBreakers()
    sync = CircuitSync(redis_cluster.url, breakers, 1.0)
    publisher = CircuitSync(redis_cluster.urls()[1], CircuitBreakers(), 1.0)
    async with _following(sync):
        await asyncio.sleep(0.5)
        listening = (await sync.redis.subscribe_address()).port
        node = next(n for n in redis_cluster.nodes if n.port == listening)
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        node.process = None
        await asyncio.to_thread(redis_cluster.wait_until_ok)  # a replica took over
        await eventually(
            lambda: (
                sync.redis.topology is not None
                and sync.redis.topology.slots[0].address.port != listening
            ),
            10,
        )
        await asyncio.sleep(0.5)  # subscribed again
        publisher.publish(Change(KEY, 1, time.time() + 60))
        await eventually(lambda: breakers.state(KEY) == "open", 5)
    await publisher.close()
