"""Admission and settlement (accounting.py) through the Redis faults the other tests do not
stage: calls that outlive their lease or straddle an outage, a connection that fails
with a settlement on it, a Redis that hangs during a shutdown. In-process proxies on
real sockets, a fake upstream, a private redis-server (killed and restarted), or a
relay in front of it that cuts or swallows what it is sent (tests/redis_relay.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.limits.admission import Accountant
from proxy.limits.lua import RENEW, SETTLE
from proxy.redis.protocol import Script
from proxy.services import SERVICES
from tests.conftest import MakeProxy, Proxy
from tests.support import Upstream, eventually, routes_yaml
from tests.support.metrics import scrape
from tests.support.redis_relay import RedisRelay
from tests.support.redis_server import Monitor, RedisServer
from tests.support.teams import MESSAGES, RESEARCH_KEY, chat, ledger, team_yaml

FLUSHED = "ledger queue flushed: Redis is back"
ERRORS = "llm_proxy_redis_errors_total"
LATENCY = "llm_proxy_redis_latency_seconds"
FIRST = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'


# Each test names its Redis (or relay) first, so that it is torn down after the proxy:
# the proxy's shutdown then writes what is queued instead of retrying it for 5 s.


@pytest.fixture
async def relay(private_redis: RedisServer) -> AsyncIterator[RedisRelay]:
    relay = RedisRelay(private_redis.port)
    yield relay
    await relay.close()


class HeldCall:
    """A streamed call the upstream holds after its first event until ``finish()``."""

    def __init__(self, proxy: Proxy, upstream: Upstream) -> None:
        self.proxy, self.upstream = proxy, upstream
        self.gate = asyncio.Event()
        self.response: aiohttp.ClientResponse | None = None

    async def start(self) -> int:
        # Each call takes the script when its stream starts: its own gate.
        self.upstream.fake.stream_script = [FIRST, self.gate, b"data: [DONE]\n\n"]
        payload = {"model": "llama-8b", "messages": MESSAGES, "stream": True}
        self.response = await self.proxy.http.post(
            self.proxy.url + "/v1/chat/completions", json=payload,
            headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
        )  # fmt: skip
        if self.response.status == 200:  # the first event: the upstream holds the call
            await self.response.content.readuntil(b"\n\n")
        return self.response.status

    async def finish(self) -> None:
        assert self.response is not None
        self.gate.set()
        await self.response.read()
        self.response.release()


def _routes(wandb: Upstream, prime: Upstream) -> str:
    # A held call may stay quiet longer than the seeds' idle timeout of 2 s.
    return routes_yaml(wandb, prime).replace("idle: 2s", "idle: 10s")


def _accountant(proxy: Proxy) -> Accountant:
    return proxy.app[SERVICES].accountant


async def _metric(proxy: Proxy, name: str, operation: str) -> float:
    return (await scrape(proxy.http, proxy.url)).value(name, operation=operation)


async def _until_metric(proxy: Proxy, name: str, operation: str, at_least: float) -> None:
    async with asyncio.timeout(5):
        while await _metric(proxy, name, operation) < at_least:
            await asyncio.sleep(0.02)


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "proxy.limits.admission" and r.levelno == level
    ]


async def test_a_call_admitted_in_an_outage_keeps_its_slot_past_its_lease_ttl(
    private_redis: RedisServer,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
):
    # The fallback's lease is renewed where it was taken, in this process's memory: were
    # it renewed in the Redis that is down, it would expire under the running call.
    private_redis.kill()
    teams = team_yaml("{concurrent: 1}", redis_url=private_redis.url, lease_ttl="1s")
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    running = HeldCall(proxy, wandb)
    assert await running.start() == 200
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.5  # two and a half lease ttls
    refused = []
    while loop.time() < until:
        refused.append((await chat(proxy))[0])
        await asyncio.sleep(0.1)
    await running.finish()
    assert set(refused) == {429}
    assert (await chat(proxy))[0] == 200  # and the slot is freed when the call ends
    await private_redis.restart()  # the queued ledger writes go, the shutdown is quick


def _tokens(line: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', line)


def _renewed(lines: list[str]) -> list[tuple[int, str]]:
    """(feed position, lease) of every lease renewal in a MONITOR feed."""
    sha = Script.of(RENEW).sha
    found = []
    for n, line in enumerate(lines):
        tokens = _tokens(line)
        if len(tokens) > 3 and tokens[0].lower() == "evalsha" and tokens[1] == sha:
            found.append((n, tokens[3 + int(tokens[2])]))
    return found


async def test_the_lease_of_a_finished_call_is_no_longer_renewed(
    private_redis: RedisServer,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
):
    teams = team_yaml("{concurrent: 5}", redis_url=private_redis.url, lease_ttl="600ms")
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    assert (await chat(proxy))[0] == 200  # connection and scripts set up
    monitor = Monitor(private_redis.port)
    first = HeldCall(proxy, wandb)
    assert await first.start() == 200
    await eventually(lambda: bool(_renewed(monitor.lines)), timeout=5)  # outlived a renewal
    lease = _renewed(monitor.lines)[0][1]
    await first.finish()
    await _accountant(proxy).settled()
    second = HeldCall(proxy, wandb)  # renewals go on for this one
    assert await second.start() == 200
    await eventually(
        lambda: sum(held != lease for _, held in _renewed(monitor.lines)) >= 2, timeout=5
    )
    await second.finish()
    await monitor.stop()
    settle = Script.of(SETTLE).sha
    (settled,) = [n for n, line in enumerate(monitor.lines) if settle in line and lease in line]
    assert [n for n, held in _renewed(monitor.lines) if held == lease and n > settled] == []


async def test_calls_that_straddle_an_outage_free_their_slots_in_redis_and_in_memory(
    persistent_redis: RedisServer,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="proxy.limits.admission")
    teams = team_yaml("{concurrent: 1}", redis_url=persistent_redis.url)
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    accountant = _accountant(proxy)
    in_redis = HeldCall(proxy, wandb)
    assert await in_redis.start() == 200  # its slot is in Redis
    persistent_redis.kill()
    in_memory = HeldCall(proxy, wandb)
    assert await in_memory.start() == 200  # admitted by this process's own limits
    await in_redis.finish()  # settled while Redis is down: queued
    await accountant.settled()
    assert await _metric(proxy, ERRORS, "settle") == 1
    await _until_metric(proxy, ERRORS, "flush", 1)  # the queue could not be written yet ...
    assert FLUSHED not in _messages(caplog, logging.INFO)  # ... and nobody says it was
    await persistent_redis.restart()
    await eventually(lambda: FLUSHED in _messages(caplog, logging.INFO), timeout=5)
    assert await _metric(proxy, LATENCY + "_count", "flush") >= 1
    await in_memory.finish()  # Redis is back; its slot was this process's
    await accountant.settled()
    assert (await chat(proxy))[0] == 200  # the queued settlement freed the slot in Redis
    persistent_redis.kill()
    assert (await chat(proxy))[0] == 200  # and the fallback's slot is free for the next outage
    await persistent_redis.restart()


async def test_a_settlement_whose_connection_fails_is_counted_warned_and_written_later(
    relay: RedisRelay,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="proxy.limits.admission")
    teams = team_yaml("{requests_per_minute: 100}", redis_url=await relay.start())
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    accountant = _accountant(proxy)
    assert (await chat(proxy))[0] == 200
    await accountant.settled()
    assert await _metric(proxy, ERRORS, "settle") == 0
    assert await _metric(proxy, LATENCY + "_count", "settle") == 1
    call = HeldCall(proxy, wandb)
    assert await call.start() == 200  # admitted: the connection is open
    relay.cut = True  # and fails when the settlement is written on it
    await call.finish()
    await accountant.settled()
    assert await _metric(proxy, ERRORS, "settle") == 1
    assert await _metric(proxy, LATENCY + "_count", "settle") == 2
    assert await _metric(proxy, LATENCY + "_sum", "settle") <= 2 * 2.0  # each within its timeout
    (warning,) = _messages(caplog, logging.WARNING)
    assert warning.startswith("redis failed during settlement (1 errors so far): Disconnected")
    relay.heal()
    await eventually(lambda: FLUSHED in _messages(caplog, logging.INFO), timeout=5)
    assert (await ledger(proxy, team="research"))["totals"]["requests"] == 2
    # Not observable otherwise (a leak per call): no finished settlement is kept.
    assert not accountant._sending and not accountant._tasks


async def test_a_shutdown_waits_until_its_deadline_for_redis_to_come_back(
    private_redis: RedisServer,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
):
    proxy = await make_proxy(_routes(wandb, prime) + team_yaml(redis_url=private_redis.url))
    accountant = _accountant(proxy)
    private_redis.kill()
    assert (await chat(proxy))[0] == 200
    await accountant.settled()  # queued
    failed = await _metric(proxy, ERRORS, "flush")
    draining = asyncio.create_task(accountant.drain(30))
    await _until_metric(proxy, ERRORS, "flush", failed + 2)  # the drain is retrying
    await private_redis.restart()
    async with asyncio.timeout(10):
        await draining
    assert _messages(caplog, logging.ERROR) == []  # nothing lost
    assert (await ledger(proxy, team="research"))["totals"]["requests"] == 1


async def test_a_shutdown_does_not_wait_past_its_deadline_for_a_hung_redis(
    relay: RedisRelay,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
):
    url = await relay.start()
    teams = team_yaml(redis_url=url).replace("timeout: 2s", "timeout: 60s")
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    accountant = _accountant(proxy)
    assert (await chat(proxy))[0] == 200  # its settlement opens the connection
    await accountant.settled()
    relay.black_hole = True  # the next settlement is never answered
    assert (await chat(proxy))[0] == 200
    async with asyncio.timeout(10):  # not the 60 s of Redis's timeout
        await accountant.drain(0.2)
    relay.heal()  # the hung settlement fails now, and is queued for the app's own drain


async def test_a_settlement_that_fails_for_another_reason_is_logged_with_its_cause(
    private_redis: RedisServer,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    # A bug, not a Redis error: nobody awaits the settlement, so only its log tells.
    private_redis.kill()
    teams = team_yaml("{requests_per_minute: 100}", redis_url=private_redis.url)
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    accountant = _accountant(proxy)
    bug = RuntimeError("a bug in the fallback's bookkeeping")

    async def broken(*args: object) -> None:
        raise bug

    monkeypatch.setattr(accountant.fallback, "settle", broken)
    assert (await chat(proxy))[0] == 200  # admitted by the fallback
    await accountant.settled()
    errors = [
        r
        for r in caplog.records
        if r.name == "proxy.limits.admission" and r.levelno == logging.ERROR
    ]
    assert [(r.getMessage(), r.exc_info and r.exc_info[1]) for r in errors] == [
        ("settlement failed", bug)
    ]
    assert not accountant._tasks  # a finished settlement is not kept (a leak otherwise)
    await private_redis.restart()


async def test_redis_errors_are_warned_once_a_second_while_they_go_on(
    private_redis: RedisServer,
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO, logger="proxy.limits.admission")
    teams = team_yaml("{requests_per_minute: 100}", redis_url=private_redis.url)
    proxy = await make_proxy(_routes(wandb, prime) + teams)
    accountant = _accountant(proxy)
    private_redis.kill()
    began = time.monotonic()
    for _ in range(2):  # a burst of errors: each admission, the first settlement
        assert (await chat(proxy))[0] == 200
        await accountant.settled()
    burst = time.monotonic() - began
    while time.monotonic() < began + 1.1:  # past the second the first warning opened
        await asyncio.sleep(0.05)
    assert (await chat(proxy))[0] == 200
    warnings = _messages(caplog, logging.WARNING)
    if burst < 1.0:  # else the burst itself may have been warned twice
        assert len(warnings) == 2, warnings
    assert warnings[-1].startswith("redis failed during admission (4 errors so far)")
    await private_redis.restart()
