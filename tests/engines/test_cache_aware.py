"""balance: cache_aware on real llama.cpp replicas: a conversation's next turn goes to
the replica that served its last one, which then reuses its prompt cache, as
llama.cpp's own /metrics show (prompt tokens taken from the cache, and those run)."""

from __future__ import annotations

import random

import aiohttp
import pytest

from proxy.config.load import parse_config
from proxy.routing.prefix_index import prefix_keys, prompt_text
from tests.engines.test_engines import (  # noqa: F401 - the fixture
    EngineProxy,
    MakeEngineProxy,
    engine_counters,
    make_engine_proxy,
)
from tests.support.engines import engine_yaml, until
from tests.support.metrics import scrape

pytestmark = pytest.mark.timeout(180)

WORDS = ("river", "stone", "market", "winter", "lantern", "signal", "orchard", "copper")
REPLICAS = ("0", "1")


def _system(seed: int) -> str:
    rng = random.Random(seed)
    return f"Document {seed}: " + " ".join(rng.choice(WORDS) for _ in range(150)) + "."


async def _served(proxy: EngineProxy, messages: list[dict[str, str]]) -> tuple[str, int, int, str]:
    """Send one call; the replica that ran it, the prompt tokens it ran and those it took
    from its cache (llama.cpp's counters, before and after), and the answer."""
    before = await engine_counters(proxy)
    reply = await proxy.client.chat.completions.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=8,
    )
    after = await engine_counters(proxy)

    def moved(name: str, replica: str) -> int:
        return int(after[(name, replica)] - before[(name, replica)])

    ran = {r: moved("llamacpp:prompt_tokens_total", r) for r in REPLICAS}
    cached = {r: moved("llamacpp:prompt_tokens_cached_total", r) for r in REPLICAS}
    busy = [r for r in REPLICAS if ran[r] or cached[r]]
    assert len(busy) == 1, (ran, cached)
    return busy[0], ran[busy[0]], cached[busy[0]], reply.choices[0].message.content or ""


async def test_a_next_turn_goes_where_its_prefix_is_cached(
    make_engine_proxy: MakeEngineProxy,  # noqa: F811
):
    proxy = await make_engine_proxy(
        engine_yaml(replicas=2, threads=1, provider="    balance: cache_aware")
    )
    await until(
        lambda: all(r.state == "ready" for r in proxy.supervisor.replicas), 60, "replicas ready"
    )
    conversations = [
        [{"role": "system", "content": _system(n)}, {"role": "user", "content": f"Question {n}?"}]
        for n in range(6)
    ]
    first, whole_blocks = [], 0
    for history in conversations:  # every first turn, then every second turn
        whole_blocks += len(prefix_keys(prompt_text({"messages": history}) or "", 256)) - 1
        replica, ran, cached, answer = await _served(proxy, history)
        first.append((replica, ran + cached))
        history.append({"role": "assistant", "content": answer or "Yes."})
        history.append({"role": "user", "content": "And then?"})
    assert {replica for replica, _ in first} == set(REPLICAS)  # both replicas took some
    for history, (home, prompt) in zip(conversations, first, strict=True):
        replica, ran, cached, _ = await _served(proxy, history)
        assert replica == home
        # The whole first turn's prompt came from the cache, though another
        # conversation ran on that replica since; only the new turn was run.
        assert cached >= prompt - 8, (cached, prompt)
        assert ran < prompt / 4, (ran, prompt)
    async with aiohttp.ClientSession() as http:
        metrics = await scrape(http, proxy.url)
    hit = metrics.value("llm_proxy_prefix_blocks_total", provider="local", result="hit")
    miss = metrics.value("llm_proxy_prefix_blocks_total", provider="local", result="miss")
    # The estimate: each second turn found every whole block of its first turn's prompt.
    assert hit == whole_blocks > 0
    assert miss > 0


def test_an_engine_without_balance_keeps_least_busy() -> None:
    config = parse_config(engine_yaml(replicas=2), {})
    assert config.providers["local"].balance == "least_busy"
