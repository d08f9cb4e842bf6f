"""Budgets in the stores: a daily and a monthly budget in micro-dollars, held at
admission by a call's worst-case cost and corrected to its real cost at settlement, per
UTC day and UTC month. The memory store on a clock of the test's own (the reset at
midnight and at the month's end, exactly), its spent amount read off the ledger rows;
the Lua scripts against a redis-server of the test's own, held to the memory store, and
their UTC month to Python's calendar.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest

from proxy.limits.lua import _COMMON
from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.store import DAY, Admission, Check, Settlement, month_of
from tests.limits.test_store_memory import Clock
from tests.support.redis_server import RedisServer

D = 20_027  # 2024-10-31: the last day of a month
T0 = D * DAY + 22 * 3600.0  # 22:00 UTC: two hours to midnight, and to November
DAILY = Check("*", "daily_usd", 1000)
MONTHLY = Check("*", "monthly_usd", 2500)
PER_MODEL = Check("m", "daily_usd", 600)


def _seen(a: Admission) -> tuple[bool, str | None, list[int]]:
    return a.admitted, a.refused.kind if a.refused else None, [s.remaining for s in a.states]


def _settled(
    store: MemoryStore | RedisStore, rid: str, checks: tuple[Check, ...], held: int, cost: int,
    day: int = D, model: str = "m",
) -> Settlement:  # fmt: skip
    return Settlement(
        rid, store.prepare("t", checks), model, day, 10, 5, 5, False, cost, "k", reserved_cost=held
    )


async def _admit(
    store: MemoryStore | RedisStore, checks: tuple[Check, ...], cost: int, rid: str
) -> Admission:
    return await store.admit(store.prepare("t", checks), 10, rid, 60.0, cost)


async def test_a_daily_budget_holds_the_worst_case_takes_the_real_cost_and_resets_at_midnight():
    clock = Clock(T0)
    store = MemoryStore(clock)
    checks = (DAILY,)
    assert _seen(await _admit(store, checks, 700, "a")) == (True, None, [300])
    refused = await _admit(store, checks, 301, "b")  # 700 held: 300 left
    assert _seen(refused) == (False, "daily_usd", [300])
    assert refused.retry_after == 2 * 3600.0 and refused.states[0].reset == 2 * 3600.0
    # The call cost 200 of the 700 it held: 800 are left, and a call of 800 fits exactly.
    store.settle_now(_settled(store, "a", checks, 700, 200))
    assert (await store.levels("t", checks)) == (D, [200])
    assert _seen(await _admit(store, checks, 800, "c")) == (True, None, [0])
    assert not (await _admit(store, checks, 1, "d")).admitted
    clock.now = (D + 1) * DAY  # midnight UTC: a new day, the whole budget
    assert _seen(await _admit(store, checks, 1000, "e")) == (True, None, [0])
    # Yesterday's call is settled today: it corrects yesterday's spending, not today's.
    store.settle_now(_settled(store, "c", checks, 800, 0))
    assert (await store.levels("t", checks)) == (D + 1, [1000])
    assert not (await _admit(store, checks, 1, "f")).admitted
    # A call larger than the whole budget can never fit.
    assert not (await _admit(MemoryStore(clock), checks, 1001, "g")).admitted


async def test_a_monthly_budget_spans_the_month_s_days_and_resets_on_the_first():
    clock = Clock(T0 - 20 * DAY)  # 2024-10-11
    store = MemoryStore(clock)
    checks = (MONTHLY,)
    await _admit(store, checks, 1500, "a")
    store.settle_now(_settled(store, "a", checks, 1500, 1500, day=D - 20))
    clock.now = T0  # 2024-10-31, 22:00: the 11th's spending still counts
    refused = await _admit(store, checks, 1001, "b")
    assert _seen(refused) == (False, "monthly_usd", [1000])
    assert refused.retry_after == 2 * 3600.0  # November starts at midnight
    assert (await _admit(store, checks, 1000, "c")).admitted
    clock.now = (D + 1) * DAY  # 2024-11-01
    assert _seen(await _admit(store, checks, 2500, "d")) == (True, None, [0])


async def test_a_team_s_and_a_model_s_budget_are_both_held_and_each_refuses():
    store = MemoryStore(Clock(T0))
    model_checks = (DAILY, PER_MODEL)
    assert _seen(await _admit(store, model_checks, 600, "a")) == (True, None, [400, 0])
    refused = await _admit(store, model_checks, 1, "b")
    assert _seen(refused) == (False, "daily_usd", [400, 0])
    assert refused.refused == PER_MODEL
    # Another model of the team spends the team's budget only.
    assert _seen(await _admit(store, (DAILY,), 400, "c")) == (True, None, [0])
    store.settle_now(_settled(store, "a", model_checks, 600, 100))
    assert (await store.levels("t", (DAILY, PER_MODEL))) == (D, [500, 100])


async def test_what_a_budget_spent_is_read_off_the_ledger_rows():
    """The ledger rows alone (as a store restored from them at start has them) spend
    the budget: a ledger-only settlement, which holds no check, books the cost."""
    store = MemoryStore(Clock(T0))
    store.settle_now(_settled(store, "x", (), 0, 900, model="m"))
    store.settle_now(_settled(store, "y", (), 0, 50, model="other"))
    store.settle_now(_settled(store, "z", (), 0, 5000, day=D - 1))  # yesterday's
    assert (await store.levels("t", (DAILY, PER_MODEL))) == (D, [950, 900])
    assert _seen(await _admit(store, (DAILY,), 50, "a")) == (True, None, [0])
    assert not (await _admit(store, (DAILY,), 1, "b")).admitted
    # Rows added behind the store's back (a restore) are read too.
    store._ledger[("t", "m", D, "restored")] = [1, 0, 0, 0, 0, 10]
    assert (await store.levels("t", (DAILY,))) == (D, [1010])


@pytest.fixture
async def redis_store(private_redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(private_redis.url, timeout=5.0)
    yield store
    await store.close()


async def test_the_scripts_hold_and_correct_budgets_as_the_memory_store(redis_store: RedisStore):
    memory = MemoryStore()
    checks = (DAILY, MONTHLY, PER_MODEL)
    steps = [("a", 500), ("b", 200), ("c", 1), ("d", 400)]
    for rid, cost in steps:
        got, want = (
            await _admit(redis_store, checks, cost, rid),
            await _admit(memory, checks, cost, rid),
        )
        assert _seen(got) == _seen(want), rid
        if not got.admitted:
            assert abs(got.retry_after - want.retry_after) < 5, rid
    day = got.day
    # "b" is more than the model's 100 left, "c" fits, "d" does not.
    assert _seen(got) == (False, "daily_usd", [499, 1999, 99]) and got.refused == PER_MODEL
    for store in (redis_store, memory):
        await store.settle(_settled(store, "a", checks, 500, 120, day=day))
        await store.settle(_settled(store, "a", checks, 500, 120, day=day))  # counted once
    assert await redis_store.levels("t", checks) == await memory.levels("t", checks)
    assert (await redis_store.levels("t", checks)) == (day, [121, 121, 121])
    assert _seen(await _admit(redis_store, checks, 479, "e")) == (True, None, [400, 1900, 0])
    # A settlement of another month's day corrects that day's and month's counts only.
    await redis_store.settle(_settled(redis_store, "f", checks, 0, 300, day=day - 40))
    assert (await redis_store.levels("t", checks))[1] == [600, 600, 600]


async def test_the_scripts_count_the_utc_month_as_python_s_calendar(private_redis: RedisServer):
    days = [
        (dt.date(year, month, 1) - dt.date(1970, 1, 1)).days + delta
        for year in (1970, 1999, 2000, 2024, 2026, 2100)
        for month in range(1, 13)
        for delta in (-1, 0)
    ]
    script = (
        _COMMON
        + "local out = {} for i = 1, #ARGV do out[i] = month_of(tonumber(ARGV[i])) end return out"
    )
    client = private_redis.client()
    try:
        got = client.eval(script, 0, *days)
    finally:
        client.close()
    assert got == [month_of(day) for day in days]
    assert month_of(D) == 2024 * 12 + 9 and month_of(D + 1) == 2024 * 12 + 10


async def test_the_scripts_count_each_utc_day_and_month_under_its_own_key(
    redis_store: RedisStore, private_redis: RedisServer
):
    """Redis's clock cannot be moved: yesterday and last month are written as a full
    budget under their keys, and today's admission reads today's and this month's."""
    day = (await redis_store.levels("t", (DAILY,)))[0]
    last_month = month_of(day) - 1
    client = private_redis.client()
    try:
        client.set(f"llmproxy:{{t}}:usd-day:*:{day - 1}", DAILY.limit)
        client.set(f"llmproxy:{{t}}:usd-month:*:m{last_month}", MONTHLY.limit)
        checks = (DAILY, MONTHLY)
        assert _seen(await _admit(redis_store, checks, 1000, "a")) == (True, None, [0, 1500])
        assert client.get(f"llmproxy:{{t}}:usd-day:*:{day}") == b"1000"
        assert client.get(f"llmproxy:{{t}}:usd-month:*:m{month_of(day)}") == b"1000"
        assert 0 < client.ttl(f"llmproxy:{{t}}:usd-day:*:{day}") <= 2 * 86400
        assert 30 * 86400 < client.ttl(f"llmproxy:{{t}}:usd-month:*:m{month_of(day)}") <= 40 * 86400
    finally:
        client.close()
