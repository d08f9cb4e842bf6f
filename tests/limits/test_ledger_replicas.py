"""``redis.ledger_replicas`` against a Redis that has no replica: a settlement is
applied (its limits corrected, its usage booked) but never confirmed, so it is kept and
sent again, counts once however often it is sent, holds no later settlement up, and is
named in the log at shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from proxy.config.model import RedisSettings
from proxy.errors import RateLimited
from proxy.limits.admission import Accountant
from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.usage import Usage
from tests.call.test_hot_path import _config
from tests.support import eventually
from tests.support.redis_server import RedisServer


async def test_a_settlement_no_replica_confirms_is_applied_kept_and_named_at_shutdown(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = RedisSettings(urls=(private_redis.url,), ledger_replicas=1)
    store = RedisStore(settings.urls, 1.0, ledger_replicas=1)
    accountant = Accountant(settings, store, MemoryStore())
    config = _config("{concurrent: 1}")
    try:
        for request_id in ("first", "second"):  # the slot is freed: applied at once
            ticket = await accountant.admit(config, "t", "m", 10, 5, request_id)
            accountant.settle_soon(ticket, Usage(5, 3))
            await accountant.settled()
        assert [s.request_id for s in accountant.unconfirmed] == ["first", "second"]
        assert not accountant.queue
        assert not await accountant.flush()  # sent again: still no replica
        day = ticket.admission.day
        [row] = await store.ledger(["t"], day, day)
        assert row.counts[:3] == (2, 10, 6)  # booked once each, however often sent
        with pytest.raises(RateLimited):  # the limits are Redis's again, not bypassed
            await accountant.admit(config, "t", "m", 10, 5, "third")
            await accountant.admit(config, "t", "m", 10, 5, "fourth")
        caplog.set_level(logging.WARNING, logger="proxy.limits.admission")
        await accountant.drain(deadline=0.5)
        unconfirmed = [r.getMessage() for r in caplog.records if "not confirmed" in r.getMessage()]
        assert len(unconfirmed) == 2 and '"request_id": "first"' in unconfirmed[0]
    finally:
        await store.close()


async def test_a_lagging_replica_holds_no_concurrency_slot_for_long(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """A replica that stops answering (SIGSTOP: still listed online) while calls flow:
    each WAIT times out. The settlements that follow wait for the WAIT in flight, not
    for one WAIT per loop turn queued in Redis, so the slots they hold stay few: a team
    whose calls never overlap is never refused at its concurrency limit, and no
    connection is given up as dead (the settlements are kept unconfirmed, not queued
    as failed)."""
    replica = RedisServer(tmp_path, args=("--replicaof", "127.0.0.1", str(private_redis.port)))
    await eventually(lambda: _in_sync(replica), timeout=10)
    settings = RedisSettings(urls=(private_redis.url,), ledger_replicas=1)
    store = RedisStore(settings.urls, 1.0, ledger_replicas=1)
    accountant = Accountant(settings, store, MemoryStore())
    config = _config("{concurrent: 20}")
    assert replica.process is not None
    try:
        ticket = await accountant.admit(config, "t", "m", 10, 5, "warm-up")
        accountant.settle_soon(ticket, Usage(5, 3))
        await accountant.settled()
        replica.process.send_signal(signal.SIGSTOP)
        for i in range(100):  # one call at a time, 10 ms apart: 1 s of WAITs timing out
            ticket = await accountant.admit(config, "t", "m", 10, 5, f"call-{i}")
            accountant.settle_soon(ticket, Usage(5, 3))
            await asyncio.sleep(0.01)
        await accountant.settled()
        assert not accountant.queue  # no settlement failed
        assert accountant.unconfirmed  # the replica confirmed none of them
    finally:
        replica.process.send_signal(signal.SIGCONT)
        replica.kill()
        await store.close()


def _in_sync(replica: RedisServer) -> bool:
    client = replica.client()
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()
