"""The Redis store (store_redis.py) on what its callers see besides the limits: the
ledger's rows, the error it reports when Redis is gone or hangs (what the proxy's
warning log line and the ledger's 503 answer carry), and the outcome that a settlement
sent without waiting reports to its callback. Against a redis-server of the test's own,
which a test may kill or stop (SIGSTOP: connections are accepted, nothing answers).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from proxy.limits.redis_store import RedisStore
from proxy.limits.store import Check, Settlement, StoreUnavailable
from tests.support import eventually
from tests.support.redis_server import RedisServer

D = 20_000  # a day, in days since the epoch
TPD = (Check("*", "tokens_per_day", 100),)


@pytest.fixture
async def store(private_redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(private_redis.url, timeout=0.5)
    yield store
    await store.close()


def _settled(store: RedisStore, rid: str, model: str, day: int, prompt: int) -> Settlement:
    return Settlement(rid, store.prepare("t", ()), model, day, 0, prompt, 1, False)


def _stop(redis: RedisServer) -> None:
    """Redis hangs: the kernel still accepts connections, no command is answered."""
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)


def _named_by_its_cause(error: StoreUnavailable) -> bool:
    cause = error.__cause__
    return cause is not None and str(error) == f"{type(cause).__name__}: {cause}"


async def test_the_ledger_answers_the_days_asked_with_models_named_with_a_colon(
    store: RedisStore,
):
    # "llama3:8b" is how Ollama names its models; the ledger index holds "day:model".
    for n, (model, day) in enumerate(
        [("llama3:8b", D - 1), ("llama3:8b", D), ("gpt", D + 1), ("gpt", D + 2)]
    ):
        await store.settle(_settled(store, f"r{n}", model, day, 10 + n))
    rows = await store.ledger(["t", "u"], D, D + 1)
    assert [(r.team, r.model, r.day, r.counts) for r in rows] == [
        ("t", "llama3:8b", D, (1, 11, 1, 0, 0, 0)),
        ("t", "gpt", D + 1, (1, 12, 1, 0, 0, 0)),
    ]


async def test_an_unreachable_redis_is_reported_with_its_cause(
    store: RedisStore, private_redis: RedisServer
):
    assert (await store.admit(store.prepare("t", TPD), 1, "a", 60.0)).admitted  # connected
    private_redis.kill()
    with pytest.raises(StoreUnavailable) as admit:
        await store.admit(store.prepare("t", TPD), 1, "b", 60.0)
    with pytest.raises(StoreUnavailable) as ledger:
        await store.ledger(["t"], D, D)
    assert _named_by_its_cause(admit.value) and _named_by_its_cause(ledger.value)


async def test_a_hung_redis_fails_a_ledger_read_instead_of_holding_it(
    store: RedisStore, private_redis: RedisServer
):
    _stop(private_redis)
    async with asyncio.timeout(10):  # only a read that waits for ever reaches this
        with pytest.raises(StoreUnavailable) as ledger:
            await store.ledger(["t"], D, D)
    assert _named_by_its_cause(ledger.value)


def _connections(redis: RedisServer) -> int:
    """How many connections Redis has accepted, this call's own included."""
    client = redis.client()
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


async def test_a_hung_redis_gets_one_attempt_at_a_ledger_read(
    store: RedisStore, private_redis: RedisServer
):
    # No retry: a Redis that hangs costs a read one timeout, not one per attempt. Counted
    # without a clock: a retry opens a connection, which Redis accepts once it runs again.
    assert await store.ledger(["t"], D, D) == []  # the read's connection is open
    before = _connections(private_redis)
    _stop(private_redis)
    with pytest.raises(StoreUnavailable):
        await store.ledger(["t"], D, D)
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGCONT)
    assert _connections(private_redis) == before + 1  # the count's own connection only


async def test_a_settlement_sent_without_waiting_reports_its_outcome(
    store: RedisStore, private_redis: RedisServer
):
    outcomes: list[StoreUnavailable | None] = []
    # No connection yet: nothing is sent, and the caller settles another way.
    assert store.settle_soon(_settled(store, "early", "m", D, 1), outcomes.append) is None
    day = (await store.admit(store.prepare("t", TPD), 50, "a", 60.0)).day
    sent = store.settle_soon(
        Settlement("a", store.prepare("t", TPD), "m", day, 50, 5, 5, False), outcomes.append
    )
    assert sent is not None
    await eventually(lambda: len(outcomes) == 1)
    assert outcomes == [None]
    assert [r.counts for r in await store.ledger(["t"], day, day)] == [(1, 5, 5, 0, 0, 0)]
    assert (await store.admit(store.prepare("t", TPD), 90, "b", 60.0)).states[
        0
    ].remaining == 0  # 50 → 10

    _stop(private_redis)
    assert store.settle_soon(_settled(store, "lost", "m", day, 1), outcomes.append) is not None
    await eventually(lambda: len(outcomes) == 2, timeout=5.0)
    failed = outcomes[1]
    assert isinstance(failed, StoreUnavailable) and _named_by_its_cause(failed)


async def test_a_call_admitted_after_a_settlement_sent_without_waiting_finds_its_slot(
    store: RedisStore,
):
    # The proxy settles from a loop callback (Accountant.settle_soon): a call of the team
    # admitted after it, in the same turn, must find the settled call's slot free, not
    # join an admission batch sent before the settlement.
    one = (Check("*", "concurrent", 1),)
    first = await store.admit(store.prepare("t", one), 1, "first", 60.0)
    assert first.admitted
    settled = Settlement("first", store.prepare("t", one), "m", first.day, 1, 1, 0, False)
    outcomes: list[StoreUnavailable | None] = []
    early = asyncio.ensure_future(store.admit(store.prepare("t", one), 1, "early", 60.0))
    asyncio.get_running_loop().call_soon(store.settle_soon, settled, outcomes.append)
    late = asyncio.ensure_future(store.admit(store.prepare("t", one), 1, "late", 60.0))
    assert ((await early).admitted, (await late).admitted) == (False, True)
    assert outcomes == [None]
