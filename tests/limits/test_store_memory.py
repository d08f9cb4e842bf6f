"""The memory store (store_memory.py) on a clock of the test's own: buckets refill at
their limit per minute and no further, leases end at their expiry or when settled, the
day's count is per UTC day and corrected by settlements, a settlement counts once, and
the ledger answers per team, model and day. Exact figures: with the clock held, a refill
or an expiry is not a matter of scheduling. The mutation run (docs/TESTING.md) found
these left unchecked by the tests that run the store through the proxy.
"""

from __future__ import annotations

from proxy.limits.memory import DONE_MAX, DONE_TTL, MemoryStore
from proxy.limits.store import DAY, Admission, Check, Settlement, TeamChecks

D = 20_000  # a day, in days since the epoch
T0 = D * DAY + 10 * 3600.0  # 10:00 UTC on it: 14 hours to midnight


class Clock:
    """The store's clock, moved by the test."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _seen(a: Admission) -> tuple[bool, str | None, list[int], list[float]]:
    refused = a.refused.kind if a.refused else None
    return a.admitted, refused, [s.remaining for s in a.states], [s.reset for s in a.states]


def _settled(
    rid: str,
    checks: tuple[Check, ...],
    reserved: int,
    prompt: int,
    completion: int,
    *,
    model: str = "m",
    day: int = D,
    team: str = "t",
    estimated: bool = False,
) -> Settlement:
    return Settlement(
        rid, TeamChecks(team, checks), model, day, reserved, prompt, completion, estimated
    )


async def test_a_bucket_refills_at_its_limit_per_minute_up_to_its_limit():
    clock = Clock()
    store = MemoryStore(clock)
    tpm = (Check("*", "tokens_per_minute", 600),)  # 10 tokens a second
    assert _seen(await store.admit(store.prepare("t", tpm), 600, "a", 60.0)) == (
        True,
        None,
        [0],
        [60.0],
    )
    clock.now += 30  # 300 back
    refused = await store.admit(store.prepare("t", tpm), 400, "b", 60.0)
    assert _seen(refused) == (False, "tokens_per_minute", [300], [30.0])
    assert refused.refused is tpm[0] and refused.retry_after == 10.0
    assert _seen(await store.admit(store.prepare("t", tpm), 300, "c", 60.0)) == (
        True,
        None,
        [0],
        [60.0],
    )
    clock.now += 3600  # an hour idle fills the bucket, and no more
    assert _seen(await store.admit(store.prepare("t", tpm), 100, "d", 60.0)) == (
        True,
        None,
        [500],
        [10.0],
    )


async def test_a_request_takes_one_from_the_requests_bucket_whatever_its_tokens():
    clock = Clock()
    store = MemoryStore(clock)
    rpm = (Check("*", "requests_per_minute", 3),)  # one back every 20 s
    for left in (2, 1, 0):
        assert (await store.admit(store.prepare("t", rpm), 500, f"r{left}", 60.0)).states[
            0
        ].remaining == left
    refused = await store.admit(store.prepare("t", rpm), 500, "over", 60.0)
    assert _seen(refused) == (False, "requests_per_minute", [0], [60.0])
    assert refused.retry_after == 20.0
    clock.now += 20
    assert _seen(await store.admit(store.prepare("t", rpm), 500, "next", 60.0)) == (
        True,
        None,
        [0],
        [60.0],
    )


async def test_a_refusal_takes_nothing_from_any_limit():
    store = MemoryStore(Clock())
    checks = (Check("*", "requests_per_minute", 10), Check("*", "tokens_per_minute", 60))
    assert _seen(await store.admit(store.prepare("t", checks), 40, "a", 60.0))[:3] == (
        True,
        None,
        [9, 20],
    )
    refused = await store.admit(store.prepare("t", checks), 30, "b", 60.0)
    assert _seen(refused)[:3] == (False, "tokens_per_minute", [9, 20])
    assert refused.refused is checks[1] and refused.retry_after == 10.0  # 1 token a second
    # The refused call took no request: this one is the second.
    assert _seen(await store.admit(store.prepare("t", checks), 20, "c", 60.0))[:3] == (
        True,
        None,
        [8, 0],
    )


async def test_limits_are_per_team_and_scope():
    store = MemoryStore(Clock())
    team_wide = Check("*", "tokens_per_day", 100)
    per_model = Check("m", "tokens_per_day", 100)
    assert (await store.admit(store.prepare("t", (team_wide,)), 100, "a", 60.0)).admitted
    assert _seen(await store.admit(store.prepare("t", (per_model,)), 30, "b", 60.0))[:3] == (
        True,
        None,
        [70],
    )
    assert _seen(await store.admit(store.prepare("u", (team_wide,)), 40, "c", 60.0))[:3] == (
        True,
        None,
        [60],
    )
    assert not (await store.admit(store.prepare("t", (team_wide,)), 1, "d", 60.0)).admitted


async def test_a_lease_holds_its_slot_until_its_expiry_which_a_renewal_moves():
    clock = Clock()
    store = MemoryStore(clock)
    one = (Check("*", "concurrent", 1),)
    assert _seen(await store.admit(store.prepare("t", one), 1, "a", 30.0)) == (
        True,
        None,
        [0],
        [0.0],
    )
    clock.now += 20
    await store.renew(store.prepare("t", (Check("*", "tokens_per_minute", 10), *one)), "a", 30.0)
    clock.now += 20  # past the admission's expiry, not the renewal's
    refused = await store.admit(store.prepare("t", one), 1, "b", 30.0)
    assert _seen(refused) == (False, "concurrent", [0], [0.0]) and refused.retry_after == 1.0
    clock.now += 10  # the renewal's expiry: the slot is free at that instant
    assert (await store.admit(store.prepare("t", one), 1, "c", 30.0)).admitted


async def test_renewing_a_lease_that_is_not_held_takes_no_slot():
    store = MemoryStore(Clock())
    two = (Check("*", "concurrent", 2),)
    assert _seen(await store.admit(store.prepare("t", two), 1, "a", 30.0))[:3] == (True, None, [1])
    await store.renew(store.prepare("t", two), "settled-already", 30.0)
    await store.renew(
        store.prepare("t", (Check("m", "concurrent", 2),)), "a", 30.0
    )  # a scope never used
    assert _seen(await store.admit(store.prepare("t", two), 1, "b", 30.0))[:3] == (True, None, [0])


async def test_a_settlement_frees_its_slot():
    store = MemoryStore(Clock())
    one = (Check("m", "concurrent", 1),)
    assert (await store.admit(store.prepare("t", one), 1, "a", 30.0)).admitted
    assert not (await store.admit(store.prepare("t", one), 1, "b", 30.0)).admitted
    await store.settle(_settled("a", one, 1, 1, 1))
    assert (await store.admit(store.prepare("t", one), 1, "c", 30.0)).admitted


async def test_a_call_that_outlived_its_lease_is_settled_all_the_same():
    # Its process stalled past the renewals: the lease expired and a later admission
    # dropped it. The settlement still books the call, and frees no one else's slot;
    # a scope with no lease here is passed over (as SETTLE's ZREM of a missing set).
    clock = Clock()
    store = MemoryStore(clock)
    one = (Check("*", "concurrent", 1),)
    assert (await store.admit(store.prepare("t", one), 1, "a", 30.0)).admitted
    clock.now += 30
    assert (await store.admit(store.prepare("t", one), 1, "b", 30.0)).admitted
    await store.settle(_settled("a", (*one, Check("m", "concurrent", 1)), 1, 3, 4))
    assert [r.counts for r in await store.ledger(["t"], D, D)] == [(1, 3, 4, 0, 0, 0)]
    assert not (await store.admit(store.prepare("t", one), 1, "c", 30.0)).admitted


async def test_the_day_counter_is_corrected_and_starts_again_at_midnight_utc():
    clock = Clock()
    store = MemoryStore(clock)
    tpd = (Check("*", "tokens_per_day", 100),)
    midnight = 14 * 3600.0
    assert _seen(await store.admit(store.prepare("t", tpd), 60, "a", 60.0)) == (
        True,
        None,
        [40],
        [midnight],
    )
    refused = await store.admit(store.prepare("t", tpd), 50, "b", 60.0)
    assert _seen(refused) == (False, "tokens_per_day", [40], [midnight])
    assert refused.retry_after == midnight
    await store.settle(_settled("a", tpd, 60, 15, 5))  # used 20 of its 60
    assert _seen(await store.admit(store.prepare("t", tpd), 80, "c", 60.0))[:3] == (True, None, [0])
    clock.now = (D + 1) * DAY  # midnight: a new day, a new count
    today = await store.admit(store.prepare("t", tpd), 100, "d", 60.0)
    assert _seen(today) == (True, None, [0], [DAY]) and today.day == D + 1
    # Yesterday's call corrects yesterday's count, not today's.
    await store.settle(_settled("c", tpd, 80, 0, 0, day=D))
    assert not (await store.admit(store.prepare("t", tpd), 1, "e", 60.0)).admitted


async def test_a_settlement_without_an_admission_here_books_its_tokens():
    # A settlement books used - reserved whether or not this store counted the day yet,
    # as the SETTLE script does (INCRBY of a missing key): the backends share semantics.
    store = MemoryStore(Clock())
    tpd = (Check("*", "tokens_per_day", 100),)
    await store.settle(_settled("elsewhere", tpd, 0, 20, 10))
    assert _seen(await store.admit(store.prepare("t", tpd), 70, "a", 60.0))[:3] == (True, None, [0])


async def test_a_settlement_corrects_the_tokens_bucket_but_not_beyond_full():
    clock = Clock()
    store = MemoryStore(clock)
    checks = (Check("*", "requests_per_minute", 60), Check("*", "tokens_per_minute", 600))
    assert (await store.admit(store.prepare("t", checks), 300, "a", 60.0)).admitted
    await store.settle(_settled("a", checks, 300, 60, 40))  # 200 unused come back
    assert _seen(await store.admit(store.prepare("t", checks), 500, "b", 60.0))[:3] == (
        True,
        None,
        [58, 0],
    )
    await store.settle(_settled("b", checks, 500, 500, 100))  # 100 more than reserved
    refused = await store.admit(store.prepare("t", checks), 1, "c", 60.0)
    assert _seen(refused)[:3] == (False, "tokens_per_minute", [58, 0])
    clock.now += 3600
    assert (await store.admit(store.prepare("t", checks), 100, "d", 60.0)).admitted
    clock.now += 3600  # full again: the correction of a call long over cannot overfill it
    await store.settle(_settled("d", checks, 100, 0, 0))
    assert _seen(await store.admit(store.prepare("t", checks), 100, "e", 60.0))[:3] == (
        True,
        None,
        [59, 500],
    )


async def test_a_retried_settlement_counts_once_for_a_day():
    clock = Clock()
    store = MemoryStore(clock)
    tpd = (Check("*", "tokens_per_day", 100),)
    assert (await store.admit(store.prepare("t", tpd), 50, "a", 60.0)).admitted
    retried = _settled("a", tpd, 50, 5, 5)
    for _ in range(2):
        await store.settle(retried)
    assert _seen(await store.admit(store.prepare("t", tpd), 90, "b", 60.0))[:3] == (True, None, [0])
    clock.now += DONE_TTL - 1
    await store.settle(retried)
    assert [r.counts for r in await store.ledger(["t"], D, D)] == [(1, 5, 5, 0, 0, 0)]
    clock.now += 1  # a day after: forgotten, so it counts again
    await store.settle(retried)
    assert [r.counts for r in await store.ledger(["t"], D, D)] == [(2, 10, 10, 0, 0, 0)]


async def test_the_last_settlements_are_remembered_and_older_ones_forgotten():
    store = MemoryStore(Clock())
    for i in range(DONE_MAX + 1):
        await store.settle(_settled(f"r{i}", (), 0, 1, 0))
    for rid in (f"r{DONE_MAX - 1}", f"r{DONE_MAX}"):  # the latest are remembered
        await store.settle(_settled(rid, (), 0, 1, 0))
    [row] = await store.ledger(["t"], D, D)
    assert row.counts[0] == DONE_MAX + 1
    await store.settle(_settled("r0", (), 0, 1, 0))  # the oldest: pushed out
    [row] = await store.ledger(["t"], D, D)
    assert row.counts[0] == DONE_MAX + 2


async def test_the_ledger_answers_per_team_model_and_day_in_the_days_asked():
    store = MemoryStore(Clock())
    for n, (team, model, day, estimated) in enumerate(
        [
            ("t", "small", D, False),
            ("t", "small", D, True),
            ("t", "large", D + 1, False),
            ("t", "large", D - 1, False),
            ("t", "large", D + 2, False),
            ("u", "small", D, False),
        ]
    ):
        await store.settle(
            _settled(
                f"r{n}", (), 0, 10 + n, 20 + n, model=model, day=day, team=team, estimated=estimated
            )
        )
    rows = await store.ledger(["t"], D, D + 1)
    assert [(r.team, r.model, r.day, r.counts) for r in rows] == [
        ("t", "large", D + 1, (1, 12, 22, 0, 0, 0)),
        ("t", "small", D, (2, 10, 20, 11, 21, 0)),
    ]
    assert [r.team for r in await store.ledger(["t", "u"], D, D)] == ["t", "u"]
    assert await store.ledger(["v"], D - 1, D + 2) == []
