"""How an engine's replicas are chosen per balance (routing/balance.py ``pick``): the
supervisor passes its ready replicas in rotation order, with their calls in flight."""

from __future__ import annotations

from proxy.config.model import Endpoint, Provider
from proxy.routing.balance import Balancer, Hint, call_hint, pick
from proxy.routing.cache_aware import PrefixRouter

KEYS = ["1", "0", "2"]  # the rotation starts at replica 1


def test_round_robin_takes_the_next_in_rotation_whatever_the_load() -> None:
    assert pick(Hint("round_robin"), KEYS, [5, 0, 0], PrefixRouter()) == (0, None)


def test_least_busy_and_no_hint_take_the_first_of_the_least_loaded() -> None:
    for hint in (None, Hint("least_busy"), Hint("weighted")):
        assert pick(hint, KEYS, [1, 0, 0], PrefixRouter()) == (1, None)


def test_affinity_keeps_a_prefix_on_one_replica_whatever_the_rotation() -> None:
    hint = Hint("affinity", affinity='[{"role": "user", "content": "hi"}]')
    chosen = [KEYS[pick(hint, KEYS, [0, 0, 0], PrefixRouter())[0]]]
    rotated = KEYS[1:] + KEYS[:1]
    chosen.append(rotated[pick(hint, rotated, [3, 0, 1], PrefixRouter())[0]])
    assert chosen[0] == chosen[1]


def test_cache_aware_returns_its_estimate() -> None:
    prefixes, blocks = PrefixRouter(), (b"k1", b"k2")
    first, _ = pick(Hint("cache_aware", blocks=blocks), KEYS, [0, 0, 0], prefixes)
    at, choice = pick(Hint("cache_aware", blocks=(*blocks, b"k3")), KEYS, [0, 0, 0], prefixes)
    assert at == first and choice is not None and (choice.matched, choice.blocks) == (2, 3)


def test_cache_aware_without_a_prompt_spreads_calls_least_busy() -> None:
    urls = ("http://a/v1", "http://b/v1")
    pool = Provider("pool", tuple(Endpoint(u) for u in urls), balance="cache_aware")
    hint = call_hint(pool, {"model": "e", "input": "text to embed"}, 2)
    assert hint == Hint("least_busy")
    assert pick(hint, KEYS, [0, 0, 0], PrefixRouter()) == (0, None)  # ties rotate
    balancer = Balancer()
    firsts = {
        balancer.order("g", pool.endpoints, "cache_aware", lambda e: e.url, lambda e: 1.0)[0].url
        for _ in range(2)
    }
    assert firsts == set(urls)  # sequential calls take turns
