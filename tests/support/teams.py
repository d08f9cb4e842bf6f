"""Fixtures for the team tests: a proxy with teams, on the memory or the Redis backend."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.call.auth import key_hash
from proxy.services import SERVICES
from tests.conftest import MakeProxy, Proxy
from tests.support import Upstream, routes_yaml
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_sentinel import RedisSentinels
from tests.support.redis_server import RedisServer, redis_binary

RESEARCH_KEY = "sk-proxy-research-0123456789"
OPS_KEY = "sk-proxy-ops-0123456789"
ADMIN_KEY = "admin-secret-key"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def team_yaml(
    limits: str = "{}",
    model_limits: str = "{}",
    redis_url: str = "",
    on_error: str = "fail_open",
    lease_ttl: str = "60s",
) -> str:
    return f"""
admin_key: {ADMIN_KEY}
redis: {{url: "{redis_url}", on_error: {on_error}, timeout: 2s, lease_ttl: {lease_ttl}}}
accounting: {{default_max_tokens: 50}}
teams:
  research:
    keys: ["{key_hash(RESEARCH_KEY)}"]
    limits: {limits}
    model_limits: {model_limits}
    headers:
      wandb: {{OpenAI-Project: acme/research-team}}
      prime: {{X-Prime-Team-ID: t-research}}
  ops:
    keys: ["{key_hash(OPS_KEY)}"]
"""


def need_redis() -> str:
    binary = redis_binary()
    if binary is None:
        pytest.fail("no redis-server on PATH; .ci/run installs it")
    return binary


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, which it may stop or flush."""
    need_redis()
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own whose keys survive a kill -9 and a restart."""
    need_redis()
    data = tmp_path / "redis-data"
    data.mkdir()
    server = RedisServer(data, persistent=True)
    yield server
    server.kill()


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One Redis Cluster for the tests that only read and write (none kills a node)."""
    need_redis()
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster of the test's own, whose nodes it may kill."""
    need_redis()
    cluster = RedisCluster(tmp_path)
    yield cluster
    cluster.stop()


MakeTeamProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture(scope="session")
def shared_sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinels]:
    """One Sentinel deployment for the tests that only read and write."""
    need_redis()
    sentinels = RedisSentinels(tmp_path_factory.mktemp("sentinel"))
    yield sentinels
    sentinels.stop()


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same tests run against every backend: "" (memory), or the URL of a Redis, of
    one node of a Redis Cluster (the proxy finds the others), or of Sentinel."""
    if request.param == "memory":
        return ""
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("shared_cluster")
        cluster.flushall()
        return cluster.url
    if request.param == "sentinel":
        sentinels: RedisSentinels = request.getfixturevalue("shared_sentinels")
        client = sentinels.primary.client()
        client.flushall()
        client.close()
        return sentinels.url
    server: RedisServer = request.getfixturevalue("shared_redis")
    client = server.client()
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def team_proxy(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, backend: str
) -> Iterator[MakeTeamProxy]:
    made: list[Proxy] = []

    async def make(**kwargs: Any) -> Proxy:
        proxy = await make_proxy(routes_yaml(wandb, prime) + team_yaml(redis_url=backend, **kwargs))
        made.append(proxy)
        return proxy

    yield make
    # A Redis error would have fallen back to memory and hidden the backend under test.
    assert [p.app[SERVICES].accountant.redis_errors for p in made] == [0] * len(made)


async def chat(proxy: Proxy, key: str | None = RESEARCH_KEY, **fields: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "llama-8b", "messages": MESSAGES, **fields}
    async with proxy.http.post(
        proxy.url + "/v1/chat/completions", json=payload, headers=headers
    ) as resp:
        return resp.status, await resp.read(), resp.headers


async def ledger(proxy: Proxy, **query: str) -> Any:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with proxy.http.get(proxy.url + "/v1/usage", params=query, headers=admin) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.fixture
def redis_sentinels(tmp_path: Path) -> Iterator[RedisSentinels]:
    """A primary, its replica and three sentinels of the test's own."""
    need_redis()
    sentinels = RedisSentinels(tmp_path)
    yield sentinels
    sentinels.stop()
