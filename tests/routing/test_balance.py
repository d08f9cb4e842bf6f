"""Endpoints of one provider: round robin, weights, least busy, affinity, circuit breaking."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from proxy.config.model import CircuitPolicy
from proxy.routing.circuit import Change, CircuitBreakers, Passage
from tests.conftest import MakeProxy, Proxy, StartApp
from tests.support import Upstream, eventually, routes_yaml
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape

CHAT = "/v1/chat/completions"


@dataclass
class Replicas:
    a: FakeUpstream
    b: FakeUpstream
    a_url: str
    b_url: str

    def counts(self) -> tuple[int, int]:
        return len(self.a.seen), len(self.b.seen)


@pytest.fixture
async def replicas(start_app: StartApp) -> Replicas:
    a, b = FakeUpstream(key=None, name="a"), FakeUpstream(key=None, name="b")
    return Replicas(a, b, await start_app(a.app()) + "/v1", await start_app(b.app()) + "/v1")


def replica_routes(r: Replicas, balance: str, weights: tuple[int, int] = (1, 1)) -> str:
    return f"""
retry: {{attempts: 2, base_delay: 10ms, max_delay: 10ms}}
providers:
  engine:
    endpoints:
      - {{url: {r.a_url}, weight: {weights[0]}}}
      - {{url: {r.b_url}, weight: {weights[1]}}}
    balance: {balance}
    circuit: {{failures: 2, cooldown: 1s, max_cooldown: 4s}}
models:
  m:
    targets: [{{provider: engine, model: smol}}]
"""


async def _chat(
    proxy: Proxy, messages: list[dict[str, str]] | None = None, model: str = "m"
) -> int:
    payload = {"model": model, "messages": messages or [{"role": "user", "content": "hi"}]}
    async with proxy.http.post(proxy.url + CHAT, json=payload) as resp:
        await resp.read()
        return resp.status


async def test_round_robin_alternates(make_proxy: MakeProxy, replicas: Replicas):
    proxy = await make_proxy(replica_routes(replicas, "round_robin"))
    for _ in range(6):
        assert await _chat(proxy) == 200
    assert replicas.counts() == (3, 3)


async def test_weighted_follows_the_weights(make_proxy: MakeProxy, replicas: Replicas):
    proxy = await make_proxy(replica_routes(replicas, "weighted", weights=(3, 1)))
    for _ in range(400):
        assert await _chat(proxy) == 200
    a, b = replicas.counts()
    assert a + b == 400
    assert 240 <= a <= 360  # expected 300, standard deviation about 9


async def test_least_busy_avoids_the_replica_with_a_call_in_flight(
    make_proxy: MakeProxy, replicas: Replicas
):
    proxy = await make_proxy(replica_routes(replicas, "least_busy"))
    release = asyncio.Event()
    for fake in (replicas.a, replicas.b):
        fake.stream_script = [b"data: {}\n\n", release, b"data: [DONE]\n\n"]
    held = await proxy.http.post(
        proxy.url + CHAT,
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    busy, idle = (replicas.a, replicas.b) if replicas.a.in_flight else (replicas.b, replicas.a)
    assert busy.in_flight == 1
    for _ in range(5):  # each finishes before the next: the held stream decides alone
        assert await _chat(proxy) == 200
    assert (len(busy.seen), len(idle.seen)) == (1, 5)
    release.set()
    await held.read()
    held.close()


async def test_affinity_keeps_a_conversation_on_one_replica(
    make_proxy: MakeProxy, replicas: Replicas
):
    proxy = await make_proxy(replica_routes(replicas, "affinity"))
    homes = []
    for conversation in range(20):
        opening = [
            {"role": "system", "content": f"You are assistant {conversation}."},
            {"role": "user", "content": "Hello"},
        ]
        before = replicas.counts()
        for turn in range(3):  # later turns append to the same prefix
            extra = [
                {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": f"turn {turn}"},
            ] * turn
            assert await _chat(proxy, opening + extra) == 200
        after = replicas.counts()
        moved = (after[0] - before[0], after[1] - before[1])
        assert moved in ((3, 0), (0, 3)), moved
        homes.append(moved[0] == 3)
    assert 0 < sum(homes) < 20  # conversations spread over both replicas


async def test_cache_aware_follows_the_prompt_prefix(make_proxy: MakeProxy, replicas: Replicas):
    proxy = await make_proxy(replica_routes(replicas, "cache_aware"))
    systems = ["Be brief. " * 60, "Answer as a pirate would. " * 25]  # ~600 bytes each
    homes: dict[str, set[int]] = {system: set() for system in systems}
    for conversation in range(8):
        system = systems[conversation % 2]
        history = [{"role": "system", "content": system}]
        before = replicas.counts()
        for turn in range(3):  # each turn extends the last one's prompt
            history.append({"role": "user", "content": f"conversation {conversation}, turn {turn}"})
            assert await _chat(proxy, history) == 200
            history.append({"role": "assistant", "content": "Aye."})
        after = replicas.counts()
        moved = (after[0] - before[0], after[1] - before[1])
        assert moved in ((3, 0), (0, 3)), moved
        homes[system].add(0 if moved[0] else 1)
    # A new conversation on a known system prompt goes where that prompt was sent.
    assert all(len(home) == 1 for home in homes.values()), homes
    hits = await scrape(proxy.http, proxy.url)
    hit = hits.value("llm_proxy_prefix_blocks_total", provider="engine", result="hit")
    miss = hits.value("llm_proxy_prefix_blocks_total", provider="engine", result="miss")
    # Every call but the two first openings finds its system prompt's two whole blocks
    # of 256 bytes; its third block on, partly the conversation's, are never sent twice.
    assert hit == 2 * 22
    assert hit + miss >= 24 * 3


async def test_circuit_opens_probes_and_closes(make_proxy: MakeProxy, replicas: Replicas):
    proxy = await make_proxy(replica_routes(replicas, "round_robin"))
    replicas.a.status = 500
    while len(replicas.a.seen) < 2:  # two consecutive failures open a's circuit
        assert await _chat(proxy) == 200  # each retried on b
    opened_at = len(replicas.a.seen)
    for _ in range(6):
        assert await _chat(proxy) == 200
    assert len(replicas.a.seen) == opened_at  # out during its cool-down
    replicas.a.status = 200
    await asyncio.sleep(1.1)
    for _ in range(6):
        assert await _chat(proxy) == 200
    assert len(replicas.a.seen) >= opened_at + 3  # probed once, then trusted again


async def test_failed_probe_doubles_the_cooldown(make_proxy: MakeProxy, replicas: Replicas):
    proxy = await make_proxy(replica_routes(replicas, "round_robin"))
    replicas.a.status = 500
    while len(replicas.a.seen) < 2:
        await _chat(proxy)
    await asyncio.sleep(1.1)
    while len(replicas.a.seen) < 3:  # the probe, which fails: now out for 2 s
        await _chat(proxy)
    await asyncio.sleep(1.1)
    for _ in range(4):
        await _chat(proxy)
    assert len(replicas.a.seen) == 3


def test_breaker_state_machine():
    now = [100.0]
    breakers = CircuitBreakers(clock=lambda: now[0])
    policy = CircuitPolicy(failures=3, cooldown=10, max_cooldown=25)
    for _ in range(2):
        breakers.failed("e", policy)
    assert breakers.admit("e", probe_lease=60) is Passage.CLOSED
    breakers.failed("e", policy)
    assert breakers.admit("e", probe_lease=60) is Passage.OPEN
    now[0] += 5
    breakers.failed("e", policy)  # a call in flight when it opened: extends to 115
    now[0] += 9.9
    assert breakers.admit("e", probe_lease=60) is Passage.OPEN
    now[0] += 0.2
    assert breakers.admit("e", probe_lease=60) is Passage.PROBE
    assert breakers.admit("e", probe_lease=60) is Passage.OPEN  # one probe at a time
    breakers.failed("e", policy)  # failed probe: 20 s
    assert breakers.state("e") == "open"
    now[0] += 19.9
    assert breakers.admit("e", probe_lease=60) is Passage.OPEN
    now[0] += 0.2
    assert breakers.admit("e", probe_lease=60) is Passage.PROBE
    breakers.failed("e", policy)  # 40 s, capped at 25
    now[0] += 25.1
    assert breakers.admit("e", probe_lease=60) is Passage.PROBE
    breakers.succeeded("e")
    assert breakers.state("e") == "closed"
    assert breakers.admit("e", probe_lease=60) is Passage.CLOSED


def test_probe_lease_expires_when_the_prober_never_reports():
    now = [0.0]
    breakers = CircuitBreakers(clock=lambda: now[0])
    policy = CircuitPolicy(failures=1, cooldown=1, max_cooldown=1)
    breakers.failed("e", policy)
    now[0] = 1.5
    assert breakers.admit("e", probe_lease=10) is Passage.PROBE
    now[0] = 5
    assert breakers.admit("e", probe_lease=10) is Passage.OPEN
    now[0] = 12
    assert breakers.admit("e", probe_lease=10) is Passage.PROBE


def test_a_cool_down_and_a_probe_lease_end_at_their_very_instant():
    now = [0.0]
    breakers = CircuitBreakers(clock=lambda: now[0])
    changes: list[Change] = []
    breakers.on_change = changes.append
    policy = CircuitPolicy(failures=1, cooldown=4, max_cooldown=100)
    breakers.failed("e", policy)  # open until 4
    now[0] = 4.0
    assert breakers.state("e") == "half_open"
    assert breakers.admit("e", probe_lease=2) is Passage.PROBE  # its lease ends at 6
    now[0] = 6.0
    assert breakers.admit("e", probe_lease=2) is Passage.PROBE  # another may probe
    before = time.time()
    breakers.failed("e", policy)  # a failed probe: open until 6 + 8
    after = time.time()
    # Shared on the wall clock: 8 s from now.
    assert before + 8 <= changes[-1].open_until <= after + 8
    now[0] = 14.0
    breakers.failed("e", policy)  # at the end of the cool-down: a failed probe too
    assert [c.opened for c in changes] == [1, 2, 3]
    breakers.succeeded("e")
    assert changes[-1] == Change("e", 0, 0.0)  # a closing, as circuit_sync.py shares it


def test_a_released_probe_lets_the_next_call_probe_and_remote_changes_merge():
    now = [0.0]
    breakers = CircuitBreakers(clock=lambda: now[0])
    policy = CircuitPolicy(failures=1, cooldown=0.25, max_cooldown=1)
    breakers.failed("e", policy)  # open until 0.25
    now[0] = 0.5
    assert breakers.admit("e", probe_lease=10) is Passage.PROBE
    breakers.released("e")  # say a 429: neither a success nor a failure
    assert breakers.admit("e", probe_lease=10) is Passage.PROBE
    breakers.released("other")  # unknown: nothing to release
    breakers.merge(Change("other", 0, 0.0))  # a closing of one this process never saw
    breakers.merge(Change("g", 1, time.time() - 10))  # its cool-down is over already
    assert breakers.admit("g", probe_lease=10) is Passage.PROBE
    # Another process opened "f" for 5 s of the wall clock: here, until now + 5.
    breakers.merge(Change("f", 1, time.time() + 5))
    now[0] += 4  # (a second of slack for the time between the two clock readings)
    assert breakers.admit("f", probe_lease=10) is Passage.OPEN
    now[0] += 1.1
    assert breakers.admit("f", probe_lease=10) is Passage.PROBE


async def test_affinity_removing_a_replica_moves_only_its_conversations(
    make_proxy: MakeProxy, start_app: StartApp
):
    fakes = [FakeUpstream(key=None, name=name) for name in "abc"]
    urls = [await start_app(fake.app()) + "/v1" for fake in fakes]

    def routes(endpoints: list[str]) -> str:
        return f"""
server: {{reload_interval: 50ms}}
providers:
  engine: {{endpoints: [{", ".join(endpoints)}], balance: affinity}}
models:
  m: {{targets: [{{provider: engine, model: smol}}]}}
"""

    def homes() -> dict[int, str]:
        """Conversation → the replica that served its latest call."""
        home = {}
        for fake in fakes:
            for seen in fake.seen:
                home[int(seen.json()["messages"][0]["content"].split()[-1])] = fake.name
        return home

    async def converse(proxy: Proxy) -> None:
        for conversation in range(60):
            opening = [
                {"role": "system", "content": f"assistant {conversation}"},
                {"role": "user", "content": "Hello"},
            ]
            assert await _chat(proxy, opening) == 200

    proxy = await make_proxy(routes(urls))
    await converse(proxy)
    before = homes()
    assert sorted(set(before.values())) == ["a", "b", "c"]
    proxy.write_config(routes(urls[:2]))  # c removed
    await eventually(lambda: len(proxy.holder.current.providers["engine"].endpoints) == 2)
    for fake in fakes:
        fake.seen.clear()
    await converse(proxy)
    after = homes()
    moved = {c for c in before if before[c] != after[c]}
    assert moved == {c for c in before if before[c] == "c"}


async def test_a_model_s_strategy_orders_its_targets(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    def model(name: str, strategy: str) -> str:
        return (
            f"  {name}:\n    strategy: {strategy}\n    targets:\n"
            "      - {provider: prime, model: p, weight: 3}\n"
            "      - {provider: wandb, model: w}\n"
        )

    extra = model("rr", "round_robin") + model("lb", "least_busy") + model("w", "weighted")
    proxy = await make_proxy(routes_yaml(wandb, prime, extra=extra))
    for _ in range(4):
        assert await _chat(proxy, model="rr") == 200
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (2, 2)  # fallback: (4, 0)
    for fake in (prime.fake, wandb.fake):
        fake.seen.clear()
    for _ in range(200):
        assert await _chat(proxy, model="w") == 200
    assert 120 <= len(prime.fake.seen) <= 180  # expected 150, standard deviation about 6
    assert len(prime.fake.seen) + len(wandb.fake.seen) == 200
    # least_busy: a stream held on prime sends the next call to wandb first.
    release = asyncio.Event()
    prime.fake.stream_script = [b"data: {}\n\n", release, b"data: [DONE]\n\n"]
    payload = {"model": "lb", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    held = await proxy.http.post(proxy.url + CHAT, json=payload)
    assert await held.content.readany() == b"data: {}\n\n"
    before = len(wandb.fake.seen)
    for _ in range(3):
        assert await _chat(proxy, model="lb") == 200
    assert len(wandb.fake.seen) == before + 3
    release.set()
    await held.read()
    held.close()
