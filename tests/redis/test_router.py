"""The router (redis/router.py) against a real Redis Cluster of 3 primaries and 3
replicas: each command reaches the owner of its key's slot, a slot that moves is
followed (MOVED, ASK), a split slot is retried a bounded number of times (TRYAGAIN),
and a single node is recognised as one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot as redis_py_key_slot

from proxy.limits.redis_store import RedisStore
from proxy.limits.store import Check, StoreUnavailable
from proxy.redis.client import Address
from proxy.redis.protocol import RespError
from proxy.redis.router import Router, key_slot
from proxy.redis.seeds import Seeds
from tests.support import eventually
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer


@pytest.mark.parametrize(
    ("url", "sentinels", "service", "node"),
    [
        (
            "redis+sentinel://s1:26380,s2/main",
            (Address("s1", 26380), Address("s2", 26379)),
            "main",
            Address(),
        ),
        (
            "rediss+sentinel://alice:p%40ss@s1:26380/my%20svc/2",
            (Address("s1", 26380, tls=True),),
            "my svc",
            Address(username="alice", password="p@ss", db=2, tls=True),
        ),
    ],
)
def test_sentinel_urls_name_sentinels_a_service_and_the_node_s_login(
    url: str, sentinels: tuple[Address, ...], service: str, node: Address
) -> None:
    """The sentinels are asked without the login (Debian's have none); the nodes they
    name get it, and TLS (rediss+) goes to both."""
    seeds = Seeds.parse([url])
    assert (seeds.addresses, seeds.service, seeds.node) == (sentinels, service, node)


@given(st.text(max_size=20))
def test_a_key_s_slot_is_redis_s_own(key: str) -> None:
    assert key_slot(key) == redis_py_key_slot(key.encode())


@pytest.fixture
async def router(shared_cluster: RedisCluster) -> AsyncIterator[Router]:
    shared_cluster.flushall()
    router = Router([shared_cluster.url], timeout=5.0)
    yield router
    await router.close()


def _value_on(node: RedisServer, key: str) -> bytes | None:
    client = node.client()
    try:
        value = client.get(key)  # a plain client: a MOVED would raise, not follow
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        client.close()


async def test_each_key_is_written_on_the_primary_that_owns_its_slot(
    router: Router, shared_cluster: RedisCluster
) -> None:
    keys = [f"key-{i}" for i in range(30)]
    await asyncio.gather(*(router.execute("SET", key, key) for key in keys))
    assert router.topology is not None and router.topology.kind == "cluster"
    owners = {key: shared_cluster.owner(key) for key in keys}
    assert len({node.port for node in owners.values()}) == 3  # every shard took some
    for key, node in owners.items():
        assert _value_on(node, key) == key.encode()


async def test_a_single_node_is_one_node(private_redis: RedisServer) -> None:
    router = Router([private_redis.url], timeout=5.0)
    try:
        await router.execute("SET", "k", "v")
        assert router.topology is not None and router.topology.kind == "node"
        assert await router.execute("GET", "k") == b"v"
    finally:
        await router.close()


async def test_seeds_that_are_down_are_passed_over(
    shared_cluster: RedisCluster, private_redis: RedisServer
) -> None:
    private_redis.kill()  # a seed that refuses connections, listed first
    router = Router([private_redis.url, shared_cluster.url], timeout=5.0)
    try:
        await router.execute("SET", "k", "v")
        assert router.topology is not None and router.topology.kind == "cluster"
    finally:
        await router.close()


async def test_a_slot_moved_to_another_primary_is_followed(
    redis_cluster: RedisCluster,
) -> None:
    router = Router([redis_cluster.url], timeout=5.0)
    try:
        await router.execute("SET", "{moving}a", "1")
        target = redis_cluster.move_slot("{moving}a", finish=True)
        assert await router.execute("GET", "{moving}a") == b"1"  # MOVED, followed
        assert router.topology is not None
        assert router.topology.owner("{moving}a").address.port == target.port
    finally:
        await router.close()


async def test_a_slot_halfway_through_a_migration_is_asked_for(
    redis_cluster: RedisCluster,
) -> None:
    router = Router([redis_cluster.url], timeout=5.0)
    store = RedisStore([redis_cluster.url], timeout=5.0)
    checks = store.prepare("moving", (Check("*", "requests_per_minute", 10),))
    try:
        await router.execute("SET", "{moving}a", "1")
        assert (await store.admit(checks, 1, "first", 60.0)).admitted
        redis_cluster.move_slot("{moving}a", finish=False)
        # The source answers ASK for keys it no longer has: followed with ASKING, for a
        # plain command and for a batched script call alike.
        assert await router.execute("GET", "{moving}a") == b"1"
        second = await store.admit(checks, 1, "second", 60.0)
        assert second.admitted and second.states[0].remaining == 8  # the same bucket
    finally:
        await router.close()
        await store.close()


async def test_a_script_whose_keys_a_migration_split_is_retried_then_fails(
    redis_cluster: RedisCluster,
) -> None:
    """TRYAGAIN (some of a script's keys moved, some not) is resent a few times with a
    backoff, then fails, so that the limiter's on_error decides: it does not hang."""
    store = RedisStore([redis_cluster.url], timeout=5.0)
    checks = store.prepare(
        "split", (Check("*", "requests_per_minute", 10), Check("*", "tokens_per_minute", 900))
    )
    try:
        assert (await store.admit(checks, 1, "first", 60.0)).admitted
        redis_cluster.move_slot("{split}", finish=False, only=("llmproxy:{split}:rpm:*",))
        with pytest.raises(StoreUnavailable, match="TRYAGAIN"):
            await store.admit(checks, 1, "second", 60.0)
    finally:
        await store.close()


async def test_a_command_redis_refuses_is_not_resent(router: Router) -> None:
    await router.execute("SET", "text", "not a hash")
    with pytest.raises(RespError, match="WRONGTYPE"):
        await router.execute("HGETALL", "text")


async def test_the_router_and_redis_py_agree_on_every_key(
    router: Router, shared_cluster: RedisCluster
) -> None:
    """What the proxy wrote, a Cluster-aware client reads back, shard by shard."""
    keys = [f"llmproxy:{{team-{i}}}:ledger-index" for i in range(20)]
    await asyncio.gather(*(router.execute("SADD", key, "1:m") for key in keys))
    client: redis.RedisCluster = shared_cluster.client()
    try:
        assert all(client.smembers(key) == {b"1:m"} for key in keys)
    finally:
        client.close()


async def test_a_cluster_that_is_down_fails_a_command_after_a_few_retries(
    redis_cluster: RedisCluster,
) -> None:
    """CLUSTERDOWN (a shard with neither primary nor replica): resent a few times with a
    backoff, then the caller's error, so that the limiter's on_error decides."""
    router = Router([redis_cluster.url], timeout=5.0)
    try:
        await router.execute("SET", "{alpha}k", "v")
        owner = redis_cluster.owner("{beta}")
        replica_of_owner = [n for n in redis_cluster.nodes if n.port != owner.port]
        for node in [owner, *replica_of_owner]:
            client = node.client()
            try:
                role = client.info("replication")
            finally:
                client.close()
            if node is owner or role.get("master_port") == owner.port:
                assert node.process is not None
                node.process.kill()
                node.process.wait()
                node.process = None
        alive = next(n for n in redis_cluster.nodes if n.process is not None)

        def down() -> bool:
            client = alive.client()
            try:
                return bool(client.cluster("info").get("cluster_state") == "fail")
            finally:
                client.close()

        await eventually(down, 10)
        with pytest.raises(RespError, match="CLUSTERDOWN"):
            await router.execute("GET", "{alpha}k")  # a shard that is up, a cluster down
    finally:
        await router.close()
