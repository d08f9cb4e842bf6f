"""``redis.ledger_replicas`` against a Redis that has no replica: a settlement is
applied (its limits corrected, its usage booked) but never confirmed, so it is kept and
sent again, counts once however often it is sent, holds no later settlement up, and is
named in the log at shutdown."""

from __future__ import annotations

import logging

import pytest

from proxy.config.model import RedisSettings
from proxy.errors import RateLimited
from proxy.limits.admission import Accountant
from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.usage import Usage
from tests.call.test_hot_path import _config
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
