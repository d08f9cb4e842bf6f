"""The Lua scripts (store_lua.py) on what takes time: buckets refilling, leases expiring
and renewed, the day's counter and its reset at midnight UTC, and the retry_after and
x-ratelimit figures a refusal reports. Against a redis-server of the test's own, held to
the memory store (store_memory.py), whose semantics they share, wherever a figure does
not depend on the exact instant; the mutation run (docs/TESTING.md) found these parts
of the scripts unchecked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.limits.store import DAY, Admission, Check, Settlement
from tests.support.redis_server import RedisServer


@pytest.fixture
async def store(private_redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(private_redis.url, timeout=5.0)
    yield store
    await store.close()


async def admitted_eventually(store: RedisStore, checks: tuple[Check, ...], reserved: int) -> None:
    """Admit a call as soon as the limits let it, failing after a few seconds (the
    condition is a Redis call, so this is tests.support.eventually's loop, awaited)."""
    async with asyncio.timeout(5.0):
        while not (await store.admit(store.prepare("t", checks), reserved, "late", 60.0)).admitted:
            await asyncio.sleep(0.01)


FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_micro_usd")  # non-zero ones


def _seen(a: Admission) -> tuple[bool, str | None, list[int]]:
    return a.admitted, a.refused.kind if a.refused else None, [s.remaining for s in a.states]


async def test_a_bucket_refills_at_its_limit_per_minute(store: RedisStore):
    tpm = (Check("*", "tokens_per_minute", 600),)  # 10 tokens a second
    assert (await store.admit(store.prepare("t", tpm), 600, "all", 60.0)).admitted
    refused = await store.admit(store.prepare("t", tpm), 10, "more", 60.0)
    assert _seen(refused) == (False, "tokens_per_minute", [0])
    assert 0.8 < refused.retry_after <= 1.0  # 10 tokens at 10 a second, less what refilled
    assert 0.8 < refused.states[0].reset <= 60.0
    await admitted_eventually(store, tpm, 10)


def bucket(redis: RedisServer) -> tuple[float, float]:
    """The tokens left in team t's tokens_per_minute bucket, and the instant (Redis's
    clock, in seconds) the script that left them ran at."""
    client = redis.client()
    try:
        left, at = client.hmget("llmproxy:{t}:tpm:*", ["t", "ts"])
    finally:
        client.close()
    assert left is not None and at is not None
    return float(left), float(at)


async def redis_clock(redis: RedisServer, until: Callable[[float], bool]) -> None:
    """Wait until Redis's clock (TIME, in seconds) satisfies ``until``: the scripts run
    on that clock, not the test's."""
    client = redis.client()
    try:
        async with asyncio.timeout(5.0):
            while True:
                seconds, micros = client.time()
                if until(seconds + micros / 1_000_000):
                    return
                await asyncio.sleep(0.005)
    finally:
        client.close()


async def test_a_bucket_refills_evenly_over_one_minute(
    store: RedisStore, private_redis: RedisServer
):
    # The refill is read from what the bucket holds after an interval on Redis's clock:
    # from admissions timed by the test, 60 s could not be told from 61 s.
    tpm = (Check("*", "tokens_per_minute", 6000),)  # 100 tokens a second
    assert (await store.admit(store.prepare("t", tpm), 6000, "all", 60.0)).admitted
    left, emptied_at = bucket(private_redis)
    assert left == 0
    await redis_clock(private_redis, lambda now: now > emptied_at + 0.5)
    assert (await store.admit(store.prepare("t", tpm), 1, "one", 60.0)).admitted
    left, at = bucket(private_redis)
    assert at > emptied_at + 0.5
    assert abs(left + 1 - (at - emptied_at) * 100) < 0.1  # refilled, less the 1 taken


async def test_a_bucket_key_lives_until_the_bucket_is_full_again(
    store: RedisStore, private_redis: RedisServer
):
    # An expired bucket reads as full: a key that expired sooner would hand out tokens
    # the limit has not refilled yet; one that lived longer would only cost memory.
    tpm = (Check("*", "tokens_per_minute", 600),)  # 10 tokens a second
    assert (await store.admit(store.prepare("t", tpm), 300, "half", 60.0)).admitted
    client = private_redis.client()
    try:
        ttl = int(client.pttl("llmproxy:{t}:tpm:*"))
    finally:
        client.close()
    assert 30_000 < ttl <= 31_000  # 300 tokens refill in 30 s, + 1 s


async def test_a_renewed_lease_that_is_never_settled_still_expires(store: RedisStore):
    # A proxy that died mid-call: its slot comes back when the lease runs out, also
    # after a renewal moved the lease's expiry.
    one = (Check("*", "concurrent", 1),)
    assert (await store.admit(store.prepare("t", one), 1, "dead", 0.3)).admitted
    await store.renew(store.prepare("t", one), "dead", 0.3)
    refused = await store.admit(store.prepare("t", one), 1, "next", 60.0)
    assert _seen(refused) == (False, "concurrent", [0]) and refused.retry_after == 1.0
    await admitted_eventually(store, one, 1)


def lease_expiry(redis: RedisServer) -> tuple[int, int]:
    """The lease "long"'s expiry, and its set's ttl, as milliseconds from Redis's now."""
    client = redis.client()
    try:
        keys = client.keys("llmproxy:{t}:conc:*")
        assert len(keys) == 1
        key = keys[0]
        score = client.zscore(key, "long")
        seconds, micros = client.time()
        assert score is not None
        return int(score) - (seconds * 1000 + micros // 1000), int(client.pttl(key))
    finally:
        client.close()


async def test_a_lease_expires_when_its_admission_then_its_renewal_says(
    store: RedisStore, private_redis: RedisServer
):
    two = (Check("*", "concurrent", 2),)
    assert (await store.admit(store.prepare("t", two), 1, "long", 90.0)).admitted
    expiry, ttl = lease_expiry(private_redis)
    assert 89_900 < expiry <= 90_000 and 179_000 < ttl <= 180_000  # the set: twice as long
    await store.renew(store.prepare("t", two), "long", 60.0)
    expiry, ttl = lease_expiry(private_redis)
    assert 59_900 < expiry <= 60_000 and 119_000 < ttl <= 120_000
    # Refusals leave the held slots as they are.
    assert (await store.admit(store.prepare("t", two), 1, "second", 60.0)).admitted
    for n in range(2):
        assert _seen(await store.admit(store.prepare("t", two), 1, f"refused-{n}", 60.0)) == (
            False,
            "concurrent",
            [0],
        )


async def test_a_lease_counts_from_the_millisecond_of_its_admission(
    store: RedisStore, private_redis: RedisServer
):
    # Admitted mid-second on Redis's clock, so milliseconds counted wrong (taken off,
    # say, instead of added) put the lease's expiry many milliseconds off; the bucket
    # admitted with it records the script's instant to compare with.
    checks = (Check("*", "concurrent", 2), Check("*", "tokens_per_minute", 6000))
    await redis_clock(private_redis, lambda now: 0.2 <= now % 1 < 0.8)
    assert (await store.admit(store.prepare("t", checks), 1, "long", 90.0)).admitted
    _, admitted_at = bucket(private_redis)
    client = private_redis.client()
    try:
        score = client.zscore("llmproxy:{t}:conc:*", "long")
    finally:
        client.close()
    assert score is not None
    assert abs(score - (admitted_at * 1000 + 90_000)) <= 1


async def test_a_limit_admits_up_to_its_last_token(store: RedisStore):
    checks = (Check("*", "tokens_per_day", 100), Check("*", "tokens_per_minute", 100))
    assert _seen(await store.admit(store.prepare("t", checks), 100, "all", 60.0)) == (
        True,
        None,
        [0, 0],
    )
    assert _seen(await store.admit(store.prepare("u", checks), 40, "some", 60.0)) == (
        True,
        None,
        [60, 60],
    )
    assert _seen(await store.admit(store.prepare("u", checks), 60, "rest", 60.0)) == (
        True,
        None,
        [0, 0],
    )
    assert not (await store.admit(store.prepare("u", checks), 1, "over", 60.0)).admitted


async def test_the_day_counter_is_corrected_and_resets_at_midnight_utc(store: RedisStore):
    tpd = (Check("*", "tokens_per_day", 100), Check("m", "tokens_per_day", 1000))
    memory = MemoryStore()
    first = await store.admit(store.prepare("t", tpd), 60, "a", 60.0)
    assert _seen(first) == _seen(await memory.admit(memory.prepare("t", tpd), 60, "a", 60.0))
    assert _seen(first) == (True, None, [40, 940])
    assert first.day == int(time.time() // DAY)  # Redis's day is the UTC day

    refused = await store.admit(store.prepare("t", tpd), 50, "b", 60.0)
    assert _seen(refused) == _seen(await memory.admit(memory.prepare("t", tpd), 50, "b", 60.0))
    midnight = (time.time() // DAY + 1) * DAY - time.time()
    assert abs(refused.retry_after - midnight) < 5 and abs(refused.states[0].reset - midnight) < 5

    # The call used 20 of its 60: the day's count drops to 20, and 50 more fit.
    used = Settlement("a", store.prepare("t", tpd), "m", first.day, 60, 15, 5, False)
    await store.settle(used)
    await memory.settle(used)
    again = await store.admit(store.prepare("t", tpd), 50, "c", 60.0)
    assert _seen(again) == _seen(await memory.admit(memory.prepare("t", tpd), 50, "c", 60.0))
    assert _seen(again) == (True, None, [30, 930])
    assert _seen(await store.admit(store.prepare("t", tpd), 101, "d", 60.0))[:2] == (
        False,
        "tokens_per_day",
    )


async def test_refusals_report_the_figures_of_the_other_backend(store: RedisStore):
    checks = (
        Check("*", "requests_per_minute", 2),
        Check("*", "tokens_per_minute", 1000),
        Check("m", "concurrent", 3),
    )
    memory = MemoryStore()
    # 2000 first: more than the per-minute limit, refused by it while requests are left
    # (a minute's wait on both); last: refused by the requests left, the first check.
    for i, reserved in enumerate([2000, 400, 500, 50, 2000]):
        got = await store.admit(store.prepare("t", checks), reserved, f"r{i}", 60.0)
        want = await memory.admit(memory.prepare("t", checks), reserved, f"r{i}", 60.0)
        assert _seen(got) == _seen(want), i
        assert abs(got.retry_after - want.retry_after) < 0.5, i
        for g, w in zip(got.states, want.states, strict=True):
            assert abs(g.reset - w.reset) < 0.5, i


async def test_one_turn_of_settlements_books_each_model_on_its_own_row(
    store: RedisStore, private_redis: RedisServer
):
    # One script run settles them all; the ledger hash is per team, day and model, with
    # the split by key label beside the totals, and each call's cost added exactly.
    checks = (Check("*", "tokens_per_day", 1000),)
    day = (await store.admit(store.prepare("t", checks), 10, "a", 60.0)).day
    for lease in ("b", "c"):
        await store.admit(store.prepare("t", checks), 10, lease, 60.0)
    settlements = [
        Settlement("a", store.prepare("t", checks), "small", day, 10, 3, 4, False, 700, "k1"),
        Settlement("b", store.prepare("t", checks), "large", day, 10, 5, 6, False, 20, "k2"),
        Settlement("c", store.prepare("t", checks), "small", day, 10, 1, 1, True, 5, "k1"),
        Settlement("d", store.prepare("t", ()), "small", day, 0, 2, 2, False, 2**53 + 1, "k2"),
        Settlement("e", store.prepare("t", ()), "free", day, 0, 1, 1, False, 0, "k3"),
    ]
    await asyncio.gather(*(store.settle(s) for s in settlements))
    rows = {row.model: (row.counts, row.keys) for row in await store.ledger(["t"], day, day)}
    assert rows == {
        "small": (
            (3, 5, 6, 1, 1, 2**53 + 706),
            (("k1", (2, 3, 4, 1, 1, 705)), ("k2", (1, 2, 2, 0, 0, 2**53 + 1))),
        ),
        "large": ((1, 5, 6, 0, 0, 20), (("k2", (1, 5, 6, 0, 0, 20)),)),
        "free": ((1, 1, 1, 0, 0, 0), (("k3", (1, 1, 1, 0, 0, 0)),)),
    }
    client = private_redis.client()
    try:
        large = client.hgetall(f"llmproxy:{{t}}:ledger:{day}:large")
        free = client.hgetall(f"llmproxy:{{t}}:ledger:{day}:free")
    finally:
        client.close()
    assert large == {
        **{f.encode(): v for f, v in zip(FIELDS, [b"1", b"5", b"6", b"20"], strict=True)},
        **{f"{f}@k2".encode(): v for f, v in zip(FIELDS, [b"1", b"5", b"6", b"20"], strict=True)},
    }
    # A call that cost nothing writes no cost field (nor any other count that is 0).
    assert free == {
        **{f.encode(): b"1" for f in FIELDS[:3]},
        **{f"{f}@k3".encode(): b"1" for f in FIELDS[:3]},
    }
    memory = MemoryStore()
    for s in settlements:
        await memory.settle(s)
    assert {
        row.model: (row.counts, row.keys) for row in await memory.ledger(["t"], day, day)
    } == rows
    # The day's count took each correction: 30 reserved, 20 used.
    assert _seen(await store.admit(store.prepare("t", checks), 980, "d", 60.0)) == (True, None, [0])


async def test_a_correction_of_one_token_counts(store: RedisStore):
    checks = (Check("*", "tokens_per_day", 100),)
    day = (await store.admit(store.prepare("t", checks), 10, "a", 60.0)).day
    await store.settle(Settlement("a", store.prepare("t", checks), "m", day, 10, 6, 5, False))
    assert _seen(await store.admit(store.prepare("t", checks), 89, "b", 60.0)) == (True, None, [0])
