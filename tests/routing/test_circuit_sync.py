"""Circuit sharing when Redis hangs, fails or comes back, and what it leaves in Redis.

The sync's own timeout (its Redis client's watchdog, and the subscription's bound) is
what must bound every command and the subscription."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import pytest

from proxy.config.model import CircuitPolicy
from proxy.routing import circuit_sync
from proxy.routing.circuit import Change, CircuitBreakers, Passage
from proxy.routing.circuit_sync import CHANNEL, STATES, CircuitSync, claim_key
from tests.redis.test_redis_subscription import subscribers
from tests.routing.test_circuit_sharing import another_change
from tests.support import dead_url, eventually
from tests.support.redis_server import Monitor, RedisServer

KEY = "http://10.0.0.5:8000/v1"
PAUSED = "circuit sharing paused, Redis failed: "


class SilentRedis:
    """Accepts connections and never answers, like a Redis that hangs; counts the
    connections its clients opened and those they closed again."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self._writers.append(writer)
        while await reader.read(1 << 16):
            pass  # the commands, never answered
        self.closed += 1

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def silent() -> AsyncIterator[SilentRedis]:
    server = SilentRedis()
    yield server
    await server.stop()


@pytest.fixture
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The follower retries after 0.1 s rather than 1 s: the same path, a faster test."""
    monkeypatch.setattr(circuit_sync, "_RETRY", 0.1)


@contextlib.asynccontextmanager
async def _following(sync: CircuitSync) -> AsyncIterator[None]:
    """``sync`` following Redis for the block; then cancelled and closed, as at shutdown."""
    follower = asyncio.ensure_future(sync.follow())
    try:
        yield
    finally:
        follower.cancel()
        await asyncio.wait([follower], timeout=5)
        await sync.close()


def _publish_other(server: RedisServer, key: str, opened: int, until: float) -> None:
    """A change as another proxy process publishes it."""
    client = server.client()
    try:
        client.publish(CHANNEL, another_change(key, opened, until))
    finally:
        client.close()


def _messages(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


async def test_a_hung_redis_costs_each_command_its_timeout_then_frees_its_connection(
    silent: SilentRedis, caplog: pytest.LogCaptureFixture
) -> None:
    url = await silent.start()
    sync = CircuitSync(url, CircuitBreakers(), timeout=0.2)
    # No answer to the election: this process decides alone, and may probe.
    assert await asyncio.wait_for(sync.claim_probe(KEY, 600.0), 5) is True
    sync.publish(Change(KEY, 1, time.time() + 60))
    await eventually(lambda: bool(_messages(caplog, "could not share circuit change")), 5)
    assert _messages(caplog, "could not share") == [
        f"could not share circuit change of {KEY}: no reply from Redis within 0.2s"
    ]
    sync.end_probe(KEY)
    # Every command was given up and its connection closed, not left held by a hung call.
    await eventually(lambda: silent.opened >= 2 and silent.closed == silent.opened, 5)
    await asyncio.wait_for(sync.close(), 5)


async def test_with_redis_down_this_process_may_probe() -> None:
    url = dead_url("").replace("http://", "redis://")  # connections refused
    sync = CircuitSync(url, CircuitBreakers(), 1.0)
    try:
        assert await sync.claim_probe(KEY, 600.0) is True
    finally:
        await sync.close()


async def test_a_hung_subscription_is_reported_and_retried(
    silent: SilentRedis, caplog: pytest.LogCaptureFixture, quick_retry: None
) -> None:
    url = await silent.start()
    sync = CircuitSync(url, CircuitBreakers(), timeout=0.2)
    async with _following(sync):
        # Reported, and tried again on a new connection. What hangs first is asking the
        # node what kind of deployment it is (proxy/redis/router.py), bounded alike.
        await eventually(lambda: len(_messages(caplog, PAUSED)) >= 2, 5)
        hung = PAUSED + "Disconnected('no reply from Redis within 0.2s')"
        assert set(_messages(caplog, PAUSED)) == {hung}
        assert silent.opened >= 2


async def test_the_follower_resumes_once_redis_is_back(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture, quick_retry: None
) -> None:
    breakers = CircuitBreakers()
    sync = CircuitSync(private_redis.url, breakers, 1.0)
    async with _following(sync):
        await eventually(lambda: subscribers(private_redis) == 1, 5)
        private_redis.kill()
        await eventually(lambda: bool(_messages(caplog, PAUSED)), 5)  # it noticed
        await private_redis.restart()
        await eventually(lambda: subscribers(private_redis) == 1, 5)
        _publish_other(private_redis, KEY, 1, time.time() + 60)
        await eventually(lambda: breakers.state(KEY) == "open", 5)


async def test_changes_published_just_before_shutdown_still_reach_redis(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    sync = CircuitSync(private_redis.url, CircuitBreakers(), 5.0)
    sync.publish(Change(KEY, 1, time.time() + 60))
    await sync.close()  # while the change is on its way
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    client = private_redis.client()
    try:
        assert client.hexists(STATES, KEY)
    finally:
        client.close()


async def test_the_probe_claim_expires_after_its_lease_and_a_change_is_no_transaction(
    private_redis: RedisServer,
) -> None:
    first = CircuitSync(private_redis.url, CircuitBreakers(), 1.0)
    second = CircuitSync(private_redis.url, CircuitBreakers(), 1.0)
    client = private_redis.client()
    try:
        assert await first.claim_probe(KEY, 600.0) is True
        assert await second.claim_probe(KEY, 600.0) is False  # one probe for all
        # A process that dies with the claim frees it after the lease, not before, never.
        assert 0 < client.pttl(claim_key(KEY)) <= 600_000
        first.publish(Change(KEY, 2, time.time() + 60))
        await eventually(lambda: bool(client.hexists(STATES, KEY)), 5)
        # One HSET and one PUBLISH, no MULTI/EXEC: nothing to make atomic.
        calls = private_redis.command_calls()
        assert (calls.get("hset"), calls.get("publish"), calls.get("multi")) == (1, 1, None)
    finally:
        client.close()
        await first.close()
        await second.close()


@pytest.fixture
async def following(private_redis: RedisServer) -> AsyncIterator[tuple[CircuitSync, list[float]]]:
    """A CircuitSync following Redis, its breakers on a clock the test moves."""
    now = [1000.0]
    breakers = CircuitBreakers(clock=lambda: now[0])
    sync = CircuitSync(private_redis.url, breakers, 1.0)
    async with _following(sync):
        await eventually(lambda: subscribers(private_redis) == 1, 5)
        yield sync, now


async def test_a_process_ignores_the_echo_of_its_own_changes(
    private_redis: RedisServer, following: tuple[CircuitSync, list[float]]
) -> None:
    sync, now = following
    breakers = sync.breakers
    breakers.failed(KEY, CircuitPolicy(failures=1, cooldown=60.0, max_cooldown=60.0))
    now[0] += 61  # its cool-down over: this process sends the probe ...
    assert breakers.admit(KEY, 600.0) is Passage.PROBE
    # ... before its own opening comes back from Redis, followed by another's change.
    client = private_redis.client()
    try:
        await eventually(lambda: bool(client.hexists(STATES, KEY)), 5)
    finally:
        client.close()
    _publish_other(private_redis, "marker", 1, time.time() + 60)
    await eventually(lambda: breakers.state("marker") == "open", 5)
    # Its own opening did not start a new cool-down: still half-open, the probe still out.
    assert breakers.state(KEY) == "half_open"
    assert breakers.admit(KEY, 600.0) is Passage.OPEN


@pytest.fixture
def frozen_wall_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """circuit_sync's wall clock, stopped."""
    wall = time.time()
    monkeypatch.setattr(circuit_sync, "time", SimpleNamespace(time=lambda: wall))
    yield wall


async def test_an_opening_that_ends_at_this_very_instant_is_applied(
    private_redis: RedisServer, frozen_wall_clock: float
) -> None:
    # Another process's opening, read from the hash at start, ends now: the endpoint is
    # half-open here too (one probe), not trusted at once.
    client = private_redis.client()
    client.hset(STATES, KEY, another_change(KEY, 1, frozen_wall_clock))
    client.close()
    breakers = CircuitBreakers()
    sync = CircuitSync(private_redis.url, breakers, 1.0)
    async with _following(sync):
        await eventually(lambda: breakers.state(KEY) == "half_open", 5)


async def test_a_probe_s_claim_is_freed_only_after_its_change_is_shared(
    private_redis: RedisServer,
) -> None:
    # A process that found the claim free before hearing of the failed probe's opening
    # would probe again: the opening goes out first, then the claim is deleted.
    sync = CircuitSync(private_redis.url, CircuitBreakers(), 1.0)
    monitor = Monitor(private_redis.port)
    try:
        assert await sync.claim_probe(KEY, 600.0) is True
        sync.publish(Change(KEY, 2, time.time() + 60))  # the probe failed
        sync.end_probe(KEY)
        client = private_redis.client()
        try:
            await eventually(lambda: not client.exists(claim_key(KEY)), 5)
        finally:
            client.close()
    finally:
        commands = await monitor.stop()
        await sync.close()
    assert [c for c in commands if c in ("hset", "publish", "del")] == ["hset", "publish", "del"]


async def test_no_probe_is_claimed_while_a_newer_opening_is_shared(
    private_redis: RedisServer,
) -> None:
    """A process whose cool-down ended, but which has not heard yet that another
    process's probe failed and opened the circuit again (the claim already freed): the
    claim checks the shared opening and refuses, so the deployment sends one probe."""
    sync = CircuitSync(private_redis.url, CircuitBreakers(), 1.0)
    client = private_redis.client()
    try:
        client.hset(STATES, KEY, another_change(KEY, 1, time.time() - 1))  # an old one
        assert await sync.claim_probe(KEY, 600.0) is True  # its cool-down is over
        client.delete(claim_key(KEY))
        client.hset(STATES, KEY, another_change(KEY, 2, time.time() + 60))  # opened again
        assert await sync.claim_probe(KEY, 600.0) is False
        assert not client.exists(claim_key(KEY))
        client.hdel(STATES, KEY)  # closed: the claim is free again
        assert await sync.claim_probe(KEY, 600.0) is True
    finally:
        client.close()
        await sync.close()


async def test_a_process_starting_later_reads_every_open_circuit(
    private_redis: RedisServer,
) -> None:
    keys = [f"http://10.0.0.{n}:8000/v1" for n in range(1, 5)]
    client = private_redis.client()
    try:
        for key in keys:
            client.hset(STATES, key, another_change(key, 1, time.time() + 60))
    finally:
        client.close()
    breakers = CircuitBreakers()
    sync = CircuitSync(private_redis.url, breakers, 1.0)
    async with _following(sync):
        await eventually(lambda: [breakers.state(k) for k in keys] == ["open"] * 4, 5)
