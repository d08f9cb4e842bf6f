"""The circuit sharing's subscription: messages in, and a cancellation that ends it at
once, whatever Redis is doing (a follower that stayed pending once held a shutdown up)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.redis.protocol import RespError
from proxy.redis.subscription import Subscription
from proxy.routing.circuit import CircuitBreakers
from proxy.routing.circuit_sync import CHANNEL, CircuitSync
from tests.support import eventually
from tests.support.redis_server import RedisServer
from tests.support.teams import need_redis


def publish(server: RedisServer, channel: str, message: bytes | str) -> None:
    client = server.client()
    try:
        client.publish(channel, message)
    finally:
        client.close()


def subscribers(server: RedisServer) -> int:
    client = server.client()
    try:
        return int(dict(client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0))
    finally:
        client.close()


async def test_messages_arrive_with_a_password_and_a_database(tmp_path: Path):
    need_redis()
    server = RedisServer(tmp_path, password="s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/2"
        subscription = await Subscription.open(url, CHANNEL, 5.0)
        try:
            publish(server, CHANNEL, b"one")
            publish(server, "another channel", b"not this")
            publish(server, CHANNEL, b"two")
            assert [await subscription.message() for _ in range(2)] == [b"one", b"two"]
        finally:
            subscription.close()
        with pytest.raises(RespError, match=r"WRONGPASS|invalid password"):
            await Subscription.open(f"redis://:wrong@127.0.0.1:{server.port}", CHANNEL, 5.0)
    finally:
        server.kill()


async def test_a_stopped_redis_ends_the_wait_with_an_error(private_redis: RedisServer):
    subscription = await Subscription.open(private_redis.url, CHANNEL, 5.0)
    try:
        waiting = asyncio.ensure_future(subscription.message())
        await asyncio.sleep(0.05)
        private_redis.kill()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, 10)
    finally:
        subscription.close()


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """Accepts connections and never answers, like a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("state", ["subscribed", "silent", "stopped"])
async def test_a_cancelled_follower_ends_at_once(
    state: str, private_redis: RedisServer, silent_redis: str
):
    url = silent_redis if state == "silent" else private_redis.url
    breakers = CircuitBreakers()
    sync = CircuitSync(url, breakers, timeout=0.5)
    follower = asyncio.ensure_future(sync.follow())
    try:
        if state != "silent":
            await eventually(lambda: subscribers(private_redis) == 1, 5.0)
            change = {"origin": "another", "key": "k", "opened": 1, "until": time.time() + 60}
            publish(private_redis, CHANNEL, json.dumps(change))
            await eventually(lambda: breakers.state("k") == "open", 5.0)  # it follows
        if state == "stopped":
            private_redis.kill()
        await asyncio.sleep(0.7)  # a timeout, a failure and a retry's sleep may fall here
        follower.cancel()
        done, _ = await asyncio.wait([follower], timeout=5)
        assert done == {follower}
        if state == "subscribed":
            await eventually(lambda: subscribers(private_redis) == 0, 5.0)  # its socket closed
    finally:
        follower.cancel()
        await sync.close()
