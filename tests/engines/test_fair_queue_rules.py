"""The fair queue's bookkeeping under any mix of arrivals, departures, clients that
leave, waits that run out, refusals and reloads (hypothesis): never more calls served
than slots, never more waiting than ``max``, every call admitted, refused or gone
exactly once, and nothing left counted when all is done. The queue runs on a real
event loop with real timers; the end-to-end behaviour is in test_fair_queue.py."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.engine import QueueSpec
from proxy.engines.fair_queue import FairQueue
from proxy.errors import EngineBusy

# One step: (team, weight, how long it holds its slot, whether its client leaves
# while it waits, the pause before the next arrival), all in milliseconds.
STEP = st.tuples(
    st.sampled_from("abc"),
    st.sampled_from([1.0, 2.0, 0.5]),
    st.integers(0, 6),
    st.booleans(),
    st.integers(0, 3),
)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(STEP, min_size=1, max_size=30),
    slots=st.integers(1, 3),
    most=st.integers(0, 4),
    reload_at=st.integers(0, 30),
)
def test_the_queue_never_overruns_and_forgets_nothing(
    steps: list[tuple[str, float, int, bool, int]], slots: int, most: int, reload_at: int
) -> None:
    asyncio.run(_run(steps, slots, most, reload_at))


async def _run(
    steps: list[tuple[str, float, int, bool, int]], slots: int, most: int, reload_at: int
) -> None:
    capacity = [slots]
    queue = FairQueue("e", QueueSpec(max=most, wait=0.004), lambda: capacity[0])
    ends: list[str] = []

    async def call(team: str, weight: float, hold: int) -> None:
        try:
            async with queue.slot(team, weight):
                assert queue.serving <= capacity[0]
                await asyncio.sleep(hold / 1000)
            ends.append("served")
        except EngineBusy:
            ends.append("refused")
        except asyncio.CancelledError:
            ends.append("left")
            raise

    tasks = []
    for i, (team, weight, hold, leaves, pause) in enumerate(steps):
        tasks.append(asyncio.create_task(call(team, weight, hold)))
        await asyncio.sleep(0)
        assert queue.depth <= most
        if leaves:
            tasks[-1].cancel()
        if i == reload_at:  # more slots and a longer wait, for the calls waiting too
            capacity[0] += 1
            queue.configure(QueueSpec(max=most, wait=0.008))
        await asyncio.sleep(pause / 1000)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(ends) == len(steps)
    assert (queue.depth, queue.serving) == (0, 0)


async def test_a_call_admitted_in_the_loop_turn_its_client_leaves_passes_the_slot_on():
    """The slot comes free and is given to the waiting call; its client leaves before
    that call runs again. The slot must go to the next call, not stay taken by nobody."""
    queue = FairQueue("e", QueueSpec(), lambda: 1)
    release = asyncio.Event()

    async def hold() -> None:
        async with queue.slot("a", 1.0):
            await release.wait()

    async def take() -> None:
        async with queue.slot("b", 1.0):
            pass

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(take())
    await asyncio.sleep(0)
    assert (queue.serving, queue.depth) == (1, 1)
    release.set()
    await asyncio.sleep(0)  # the holder ran: it left the slot, which went to the waiter
    assert holder.done() and (queue.serving, queue.depth) == (1, 0)
    waiting.cancel()  # before the waiter ran again
    await asyncio.gather(waiting, return_exceptions=True)
    assert queue.serving == 0
    await asyncio.wait_for(take(), timeout=1)  # the next call gets the slot at once
