"""balance: cache_aware's prefix index and choice, as units, with property tests."""

from __future__ import annotations

import dataclasses
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import CacheAware
from proxy.routing.cache_aware import Choice, PrefixRouter
from proxy.routing.prefix_index import BYTES_PER_BLOCK, PrefixIndex, prefix_keys, prompt_text

BLOCK = 16  # small blocks, so that short generated prompts span several
POLICY = CacheAware(block_bytes=BLOCK)
SYSTEMS = ["You are terse. " * 5, "You are a pirate. " * 5, "Answer in French. " * 5]

Messages = list[dict[str, Any]]

# A conversation: one of a few shared system prompts, then a few turns.
conversations = st.lists(
    st.tuples(
        st.sampled_from(SYSTEMS),
        st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=12,
)


def messages(system: str, turns: list[str]) -> Messages:
    out: Messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return out


def keys(msgs: Messages) -> tuple[bytes, ...]:
    text = prompt_text({"messages": msgs})
    assert text is not None
    return prefix_keys(text, BLOCK)


def replay(history: list[tuple[str, list[str]]], replicas: int) -> tuple[PrefixRouter, list[int]]:
    """Route every turn of every conversation, idle replicas; where each call went."""
    router, names, went = PrefixRouter(), [f"r{i}" for i in range(replicas)], []
    for system, turns in history:
        for upto in range(1, len(turns) + 1):
            choice = router.choose(
                names, [0] * replicas, keys(messages(system, turns[:upto])), POLICY
            )
            went.append(choice.index)
    return router, went


def _extend_the_last(
    history: list[tuple[str, list[str]]], replicas: int, more: str
) -> tuple[PrefixRouter, list[int], list[str], tuple[bytes, ...]]:
    """The history replayed; then the keys of its last call with one more message."""
    router, went = replay(history, replicas)
    system, turns = history[-1]
    names = [f"r{i}" for i in range(replicas)]
    return router, went, names, keys(messages(system, [*turns, more]))


@given(st.text(max_size=300), st.text(max_size=300))
def test_a_key_names_its_whole_prefix(head: str, tail: str) -> None:
    whole = len(head.encode()) // BLOCK  # the blocks that lie wholly inside head
    assert prefix_keys(head + tail, BLOCK)[:whole] == prefix_keys(head, BLOCK)[:whole]


@given(conversations)
def test_later_turns_extend_the_earlier_turns_keys(history: list[tuple[str, list[str]]]) -> None:
    for system, turns in history:
        first, later = keys(messages(system, turns[:1])), keys(messages(system, turns))
        whole = len(first) - 1  # the last block of the first turn may be partial
        assert later[:whole] == first[:whole]


@settings(max_examples=50)
@given(st.lists(st.lists(st.binary(min_size=8, max_size=8), max_size=50), max_size=40),
       st.integers(min_value=1, max_value=64))  # fmt: skip
def test_the_index_never_holds_more_than_its_cap(prompts: list[list[bytes]], cap: int) -> None:
    index = PrefixIndex(cap)
    for prompt in prompts:
        index.add(prompt)
        assert len(index) <= cap
        # The prompt just added keeps its first blocks, whatever was evicted.
        assert index.matched(prompt) == min(len(prompt), cap) or len(set(prompt)) < len(prompt)


@pytest.mark.parametrize("memory", [100_000, 420_000, 1_300_000])
def test_the_memory_cap_holds_in_bytes(memory: int) -> None:
    policy = dataclasses.replace(POLICY, index_memory=memory)
    router = PrefixRouter()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(memory // 100 // 26 * 2):  # twice as many blocks as the cap
            router.choose(["a"], [0], prefix_keys(f"{i}:" + "x" * 400, BLOCK), policy)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert len(router.indexes["a"]) == memory // BYTES_PER_BLOCK
    assert grown <= memory


@given(conversations, st.integers(min_value=2, max_value=4))
def test_the_same_history_gives_the_same_choices(
    history: list[tuple[str, list[str]]], replicas: int
) -> None:
    # Two proxy processes that saw the same calls, sharing nothing: they choose alike.
    assert replay(history, replicas)[1] == replay(history, replicas)[1]


@given(conversations, st.integers(min_value=2, max_value=4), st.text(min_size=1, max_size=40))
def test_a_call_extending_a_prompt_goes_where_that_prompt_went(
    history: list[tuple[str, list[str]]], replicas: int, more: str
) -> None:
    router, went, names, extended = _extend_the_last(history, replicas, more)
    system, turns = history[-1]
    previous = keys(messages(system, turns))
    held = [router.indexes[n].matched(extended) for n in names]
    choice = router.choose(names, [0] * replicas, extended, POLICY)
    # It scores highest where the previous prompt went: every block of it is there.
    assert held[went[-1]] >= len(previous) - 1
    assert choice.matched == max(held)
    assert choice.index == went[-1] or held[choice.index] == held[went[-1]]


@given(conversations, st.integers(min_value=2, max_value=4), st.text(min_size=1, max_size=40))
def test_unless_that_replica_is_overloaded(
    history: list[tuple[str, list[str]]], replicas: int, more: str
) -> None:
    router, went, names, extended = _extend_the_last(history, replicas, more)
    loads = [0] * replicas
    loads[went[-1]] = POLICY.imbalance_calls  # the others idle: past both thresholds
    choice = router.choose(names, loads, extended, POLICY)
    assert loads[choice.index] == 0


def test_a_call_matching_nowhere_goes_to_the_least_loaded() -> None:
    router = PrefixRouter()
    router.choose(["a", "b", "c"], [0, 0, 0], keys(messages(SYSTEMS[0], ["hi"])), POLICY)
    fresh = keys(messages(SYSTEMS[1], ["hello"]))
    assert router.choose(["a", "b", "c"], [2, 1, 3], fresh, POLICY) == Choice(1, 0, len(fresh))


def test_the_load_term_trades_a_little_match_for_less_load() -> None:
    router, names, system = PrefixRouter(), ["a", "b"], SYSTEMS[0] * 4
    shared = messages(system, ["q" * 16])
    first = router.choose(names, [0, 0], keys(shared), POLICY).index
    other = 1 - first
    # The other replica serves a conversation on the same system prompt: it holds the
    # system prompt's blocks, but not the first conversation's question.
    router.indexes[names[other]].add(keys(messages(system, ["z" * 16])))

    def follow(reply: str) -> tuple[bytes, ...]:
        return keys([*shared, {"role": "assistant", "content": reply}])

    assert router.choose(names, [0, 0], follow("ok"), POLICY).index == first
    # Three more calls in flight on the first (0.1 each) outweigh its few extra blocks,
    # and stay below the imbalance threshold (4).
    loads = [0, 0]
    loads[first] = 3
    later = follow("fine")
    held = [router.indexes[n].matched(later) for n in names]
    assert 0 < held[other] < held[first] and held[first] - held[other] < 0.3 * len(later)
    assert router.choose(names, loads, later, POLICY) == Choice(other, held[other], len(later))
