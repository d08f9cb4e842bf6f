"""Which replica a call admitted by the fair queue goes to, with two replicas of one
slot each (the fake engine, tests/support/fake_engine.py, as real processes): a call
goes to a replica with a free slot, not to a busy one while the other idles, and
``cache_aware`` may stack calls on the busy replica that holds their prefix (up to its
imbalance threshold) without keeping the free replica from the next call in the queue.

The fake engine serves calls concurrently, so a call on a busy replica shows up as that
replica's second call in flight; calls whose message starts with "long" are held until
the test ends, so the counts stand still while they are read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.engines.test_fair_queue import (  # noqa: F401
    MakeQueueProxy,
    QueueProxy,
    make_queue_proxy,
)
from tests.support import eventually

pytestmark = pytest.mark.timeout(60)

ENGINE = "      slots: 1\n      replicas: 2\n    balance: {balance}"
HOLD = ', "--hold-long", "60"'
Call = asyncio.Task[tuple[int, Any, float]]
Held = list[Call]


def _document(name: str) -> str:
    """A system prompt of many prefix blocks, its own from the first byte."""
    return f"Document {name}. " + " ".join(f"{name} line {i}." for i in range(300))


A, C = _document("alpha"), _document("gamma")


@pytest.fixture
def held() -> Iterator[Held]:
    """The calls held on the engine, whose clients leave when the test ends."""
    tasks: Held = []
    yield tasks
    for task in tasks:
        task.cancel()


async def _two_replicas(
    make_queue_proxy: MakeQueueProxy,  # noqa: F811
    balance: str,
) -> QueueProxy:
    proxy = await make_queue_proxy(0.05, ENGINE.format(balance=balance), args=HOLD)
    replicas = proxy.supervisor.replicas
    await eventually(lambda: all(r.state == "ready" for r in replicas), timeout=10)
    return proxy


async def _in_flight(proxy: QueueProxy, *counts: int) -> None:
    replicas = proxy.supervisor.replicas
    await eventually(lambda: tuple(r.in_flight for r in replicas) == counts, timeout=10)


async def _send(proxy: QueueProxy, system: str, content: str) -> Call:
    """A call of team x, once the engine has it."""
    task = proxy.send("x", content, system)
    await proxy.serving(content)
    return task


async def test_round_robin_skips_a_busy_replica_while_another_is_free(
    make_queue_proxy: MakeQueueProxy,  # noqa: F811
    held: Held,
):
    """The first call holds replica 0, a quick one goes to replica 1 and ends: the
    rotation's turn is replica 0 again, but it is busy and 1 is free, so the next call
    goes to 1 (it used to join the busy one and leave 1 idle)."""
    proxy = await _two_replicas(make_queue_proxy, "round_robin")
    held.append(await _send(proxy, "s", "long-1"))
    await _in_flight(proxy, 1, 0)
    assert (await (await _send(proxy, "s", "quick")))[0] == 200
    held.append(await _send(proxy, "s", "long-2"))
    await _in_flight(proxy, 1, 1)


async def _cache_aware(
    make_queue_proxy: MakeQueueProxy,  # noqa: F811
    held: Held,
) -> tuple[QueueProxy, int]:
    """Document A's first call held on its replica ("home"), and a call of document C
    served on the other one (no match anywhere: the least loaded), which is free again."""
    proxy = await _two_replicas(make_queue_proxy, "cache_aware")
    held.append(await _send(proxy, A, "long-a1"))
    home = next(i for i, r in enumerate(proxy.supervisor.replicas) if r.in_flight)
    assert (await (await _send(proxy, C, "c1")))[0] == 200
    return proxy, home


def _at(home: int, there: int, other: int) -> tuple[int, int]:
    """In-flight counts by replica index, given the home replica's and the other's."""
    return (there, other) if home == 0 else (other, there)


async def test_cache_aware_stacks_on_its_prefix_and_passes_the_free_slot_on(
    make_queue_proxy: MakeQueueProxy,  # noqa: F811
    held: Held,
):
    """A's next calls stack on A's busy replica (a prefill elsewhere costs more than
    the wait) and leave the free slot they were admitted to free: C's next call, behind
    them in the queue, takes it at once, not after one of A's calls ends."""
    proxy, home = await _cache_aware(make_queue_proxy, held)
    for content in ("long-a2", "long-a3"):
        held.append(await _send(proxy, A, content))
    held.append(await _send(proxy, C, "long-c2"))
    await _in_flight(proxy, *_at(home, 3, 1))
    assert proxy.supervisor.queue.depth == 0


async def test_cache_aware_stacks_no_further_than_its_imbalance_threshold(
    make_queue_proxy: MakeQueueProxy,  # noqa: F811
    held: Held,
):
    """With the other replica idle, A's calls stack on A's replica until it has
    imbalance_calls (4) more in flight; the next one goes to the idle replica."""
    proxy, home = await _cache_aware(make_queue_proxy, held)
    for content in ("long-a2", "long-a3", "long-a4"):
        held.append(await _send(proxy, A, content))
    await _in_flight(proxy, *_at(home, 4, 0))
    held.append(await _send(proxy, A, "long-a5"))
    await _in_flight(proxy, *_at(home, 4, 1))
