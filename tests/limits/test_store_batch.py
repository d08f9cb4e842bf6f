"""Calls gathered into one script run (resp_batch.py) decide what they would one by one.

The Redis store batches the admissions (and settlements) of a team made in one loop
turn. Each test makes its calls in one turn (asyncio.gather), against a redis-server of
its own, and holds the outcome to what the memory store decides for the same calls
made one after another at one instant.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.store import Admission, Check, Settlement, StoreUnavailable, TeamChecks
from tests.support.redis_server import RedisServer

CHECKS = (
    Check("*", "requests_per_minute", 8), Check("*", "tokens_per_minute", 1000),
    Check("m", "concurrent", 4), Check("*", "tokens_per_day", 1_000_000),
)  # fmt: skip
RESERVED = [100, 300, 50, 700, 20, 100, 100, 10]


@pytest.fixture
async def store(private_redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(private_redis.url, timeout=5.0)
    # Connected, scripts loaded: the calls under test are not queued behind the opening.
    await store.admit(store.prepare("warm-up", CHECKS), 1, "warm-up", 60.0)
    yield store
    await store.close()


def decided(admissions: list[Admission]) -> list[tuple[bool, str | None, list[int]]]:
    """What a caller sees: admitted or not, the refusing limit, and every x-ratelimit
    remaining figure."""
    return [
        (a.admitted, a.refused.kind if a.refused else None, [s.remaining for s in a.states])
        for a in admissions
    ]


def settlement(
    checks: TeamChecks, request_id: str, day: int, used: int, estimated: bool = False
) -> Settlement:
    return Settlement(request_id, checks, "m", day, 200, used // 2, used - used // 2, estimated)


async def test_admissions_made_in_one_turn_run_as_one_script_and_decide_as_one_by_one(
    store: RedisStore, private_redis: RedisServer
):
    checks = store.prepare("t", CHECKS)  # once, as a config load does
    before = private_redis.command_calls()
    got = await asyncio.gather(
        *(store.admit(checks, r, f"lease-{i}", 60.0) for i, r in enumerate(RESERVED))
    )
    assert private_redis.command_calls()["evalsha"] - before["evalsha"] == 1

    memory = MemoryStore(clock=lambda: 1_000_000.0)
    want = [
        await memory.admit(memory.prepare("t", CHECKS), r, f"lease-{i}", 60.0)
        for i, r in enumerate(RESERVED)
    ]
    assert decided(got) == decided(want)
    # The mix is what makes the comparison worth having: admitted calls, and refusals by
    # the token bucket (700 does not fit) and by the concurrency limit (the fifth call).
    assert [a.refused.kind if a.refused else None for a in got] == [
        None,
        None,
        None,
        "tokens_per_minute",
        None,
        "concurrent",
        "concurrent",
        "concurrent",
    ]


async def test_settlements_in_one_turn_book_once_each_and_free_their_slots(store: RedisStore):
    checks = store.prepare("t", CHECKS)  # once, as a config load does
    admitted = await asyncio.gather(*(store.admit(checks, 200, f"r{i}", 60.0) for i in range(4)))
    assert all(a.admitted for a in admitted)
    day = admitted[0].day
    memory = MemoryStore(clock=lambda: day * 86_400.0 + 100.0)
    for i in range(4):
        await memory.admit(memory.prepare("t", CHECKS), 200, f"r{i}", 60.0)

    # r0 twice (a retried settlement) in the same run; refunds and a charge; an
    # estimated one, booked apart.
    settlements = [
        settlement(checks, "r0", day, 150),
        settlement(checks, "r1", day, 300),
        settlement(checks, "r0", day, 150),
        settlement(checks, "r2", day, 40, estimated=True),
    ]
    await asyncio.gather(*(store.settle(s) for s in settlements))
    for s in settlements:
        await memory.settle(s)

    rows = await store.ledger(["t"], day, day)
    assert rows == await memory.ledger(["t"], day, day)
    assert rows[0].counts == (3, 75 + 150, 75 + 150, 20, 20, 0)
    # The slots of r0, r1 and r2 are free, r3's is held: three more calls fit, not four.
    again = await asyncio.gather(*(store.admit(checks, 10, f"s{i}", 60.0) for i in range(4)))
    want = [await memory.admit(memory.prepare("t", CHECKS), 10, f"s{i}", 60.0) for i in range(4)]
    assert decided(again) == decided(want)
    assert [a.admitted for a in again] == [True, True, True, False]


async def test_a_call_made_after_a_settlement_is_not_moved_before_it(store: RedisStore):
    one = (Check("*", "concurrent", 1),)
    one_checks = store.prepare("t", one)  # once, as a config load does
    first = await store.admit(one_checks, 1, "first", 60.0)
    assert first.admitted
    # One turn: a call that must find the slot taken, the first call's settlement, and a
    # call that must find it free. Joining the earlier call's batch would put the last
    # call before the settlement.
    early, _, late = await asyncio.gather(
        store.admit(one_checks, 1, "early", 60.0),
        store.settle(Settlement("first", one_checks, "m", first.day, 1, 1, 0, False)),
        store.admit(one_checks, 1, "late", 60.0),
    )
    assert (early.admitted, late.admitted) == (False, True)


async def test_a_batch_meeting_an_emptied_script_cache_is_sent_again_by_eval(
    store: RedisStore, private_redis: RedisServer
):
    checks = store.prepare("t", CHECKS)  # once, as a config load does
    client = private_redis.client()
    client.script_flush()
    client.close()
    got = await asyncio.gather(*(store.admit(checks, 10, f"r{i}", 60.0) for i in range(3)))
    assert [a.admitted for a in got] == [True, True, True]
    assert got[2].states[0].remaining == 5  # rpm 8: two taken before it, and its own


async def test_when_redis_stops_every_call_of_a_batch_fails_on_its_own(
    store: RedisStore, private_redis: RedisServer
):
    checks = store.prepare("t", CHECKS)  # once, as a config load does
    private_redis.kill()
    got = await asyncio.gather(
        *(store.admit(checks, 10, f"r{i}", 60.0) for i in range(3)),
        return_exceptions=True,
    )
    assert [type(e) for e in got] == [StoreUnavailable] * 3
    assert len({id(e) for e in got}) == 3
