"""Prices and costs end to end: what the ledger books in micro-dollars for a plain call,
a stream, a fallback to a pricier target, cached tokens and a stream cut mid-way, on
every backend. Prices here are whole micro-dollars per token (2 USD per million tokens
is 2 µ$ a token), so each expected cost is exact arithmetic on the upstream's usage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.config.model import Price
from proxy.limits.cost import cost_micros
from proxy.limits.usage import Usage
from proxy.services import SERVICES
from tests.conftest import MakeProxy, Proxy
from tests.support import ROOT, Upstream, eventually, routes_yaml
from tests.support.fake_upstream import Fault
from tests.support.metrics import scrape
from tests.support.teams import ADMIN_KEY, OPS_KEY, RESEARCH_KEY, MakeTeamProxy, chat, ledger
from tests.support.teams import team_yaml as _team_yaml

# The ledger splits by key name; a bare hash is named after its first 12 hex digits.
RESEARCH = "sha256:" + hashlib.sha256(RESEARCH_KEY.encode()).hexdigest()[:12]
OPS = "sha256:" + hashlib.sha256(OPS_KEY.encode()).hexdigest()[:12]
USAGE = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
CACHED = {**USAGE, "prompt_tokens_details": {"cached_tokens": 60}}


def priced_yaml(wandb: Upstream, prime: Upstream, backend: str) -> str:
    """wandb: 2 µ$ a prompt token, 8 a completion token, 1 a cached one; prime: 1 and 2;
    llama-70b's fallback to wandb has its own price, 5 and 20."""
    return (
        routes_yaml(wandb, prime)
        .replace(
            "    headers: {OpenAI-Project: acme/research}\n",
            "    headers: {OpenAI-Project: acme/research}\n"
            "    price: {input: 2, output: 8.0, cached_input: 1}\n",
        )
        .replace(
            "    headers: {X-Prime-Team-ID: team-42}\n",
            "    headers: {X-Prime-Team-ID: team-42}\n    price: {input: 1, output: 2}\n",
        )
        .replace(
            "{provider: wandb, model: meta-llama/Llama-3.1-70B-Instruct}",
            "{provider: wandb, model: meta-llama/Llama-3.1-70B-Instruct,"
            " price: {input: 5, output: 20}}",
        )
    ) + _team_yaml(redis_url=backend)


@pytest.fixture
def priced(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, backend: str
) -> Iterator[MakeTeamProxy]:
    made: list[Proxy] = []

    async def make() -> Proxy:
        proxy = await make_proxy(priced_yaml(wandb, prime, backend))
        made.append(proxy)
        return proxy

    yield make
    # A Redis error would have fallen back to memory and hidden the backend under test.
    assert [p.app[SERVICES].accountant.redis_errors for p in made] == [0] * len(made)


def answer(usage: dict[str, Any]) -> bytes:
    message = {"role": "assistant", "content": "Paris."}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return json.dumps(
        {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage}
    ).encode()


def costs(**counts: int) -> dict[str, Any]:
    """A ledger entry's cost fields: micro-dollars and USD."""
    return {"cost_micro_usd": counts["micros"], "cost_usd": counts["micros"] / 1_000_000}


async def test_a_plain_call_and_a_stream_cost_their_tokens_at_the_target_s_price(
    priced: MakeTeamProxy, wandb: Upstream
):
    proxy = await priced()
    await chat(proxy)
    await chat(proxy, stream=True)  # billed from the usage chunk the proxy asked for
    await chat(proxy, key=OPS_KEY)
    plain, streamed, ops = wandb.fake.reported
    micros = [2 * u["prompt_tokens"] + 8 * u["completion_tokens"] for u in (plain, streamed)]
    report = await ledger(proxy, team="research")
    [row] = report["data"]
    assert row["cost_micro_usd"] == sum(micros) > 0
    assert row["cost_usd"] == sum(micros) / 1_000_000
    assert row["keys"] == {
        RESEARCH: {
            "requests": 2,
            "prompt_tokens": plain["prompt_tokens"] + streamed["prompt_tokens"],
            "completion_tokens": plain["completion_tokens"] + streamed["completion_tokens"],
            "estimated_prompt_tokens": 0,
            "estimated_completion_tokens": 0,
            "cost_micro_usd": sum(micros),
            "cost_usd": sum(micros) / 1_000_000,
        }
    }
    everyone = (await ledger(proxy))["totals"]
    ops_micros = 2 * ops["prompt_tokens"] + 8 * ops["completion_tokens"]
    assert everyone["cost_micro_usd"] == sum(micros) + ops_micros
    assert everyone["keys"][OPS]["cost_micro_usd"] == ops_micros
    metrics = await scrape(proxy.http, proxy.url)
    exported = metrics.value(
        "llm_proxy_cost_usd_total", team="research", model="llama-8b", provider="wandb"
    )
    assert exported == pytest.approx(sum(micros) / 1_000_000, abs=1e-9)


async def test_a_fallback_is_billed_at_the_price_of_the_target_that_served_it(
    priced: MakeTeamProxy, wandb: Upstream, prime: Upstream
):
    """prime (1 and 2 µ$ a token) fails over to wandb's llama-70b target (5 and 20): the
    call costs wandb's target price; the failed attempt costs nothing, unless prime's
    error reported usage."""
    proxy = await priced()
    error_with_usage = json.dumps({"error": {"message": "overloaded"}, "usage": USAGE}).encode()
    prime.fake.faults = [Fault(status=503), Fault(status=503, body=error_with_usage)]
    wandb.fake.faults = [Fault(body=answer(USAGE)), Fault(body=answer(USAGE))]
    for _ in range(2):
        status, _, _ = await chat(proxy, model="llama-70b")
        assert status == 200
    await chat(proxy, model="llama-70b")  # prime serves: its own price
    served_by_prime = prime.fake.reported[-1]
    [row] = (await ledger(proxy, team="research"))["data"]
    fallback = 5 * 100 + 20 * 10
    failed_with_usage = 1 * 100 + 2 * 10
    by_prime = served_by_prime["prompt_tokens"] + 2 * served_by_prime["completion_tokens"]
    assert row["cost_micro_usd"] == 2 * fallback + failed_with_usage + by_prime
    # The tokens are the answers' only: a failed attempt's usage is in its cost alone.
    assert row["prompt_tokens"] == 2 * 100 + served_by_prime["prompt_tokens"]
    metrics = await scrape(proxy.http, proxy.url)
    by_provider = {
        provider: metrics.value("llm_proxy_cost_usd_total", model="llama-70b", provider=provider)
        for provider in ("wandb", "prime")
    }
    # Counted by the provider that answered the call.
    assert by_provider["wandb"] == pytest.approx((2 * fallback + failed_with_usage) / 1e6)
    assert by_provider["prime"] == pytest.approx(by_prime / 1e6)


async def test_cached_prompt_tokens_are_billed_at_the_cached_input_price(
    priced: MakeTeamProxy, wandb: Upstream
):
    proxy = await priced()
    wandb.fake.faults = [Fault(body=answer(CACHED))]
    await chat(proxy)
    usage_chunk = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": CACHED}
    wandb.fake.stream_script = [
        b'data: {"choices":[{"index":0,"delta":{"content":"Paris."}}]}\n\n',
        b"data: " + json.dumps(usage_chunk).encode() + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    status, body, _ = await chat(proxy, stream=True)
    assert status == 200 and b"usage" not in body  # asked for by the proxy, stripped
    # 40 uncached prompt tokens at 2, 60 cached at 1, 10 completion tokens at 8.
    one = 40 * 2 + 60 * 1 + 10 * 8
    [row] = (await ledger(proxy, team="research"))["data"]
    assert row["cost_micro_usd"] == 2 * one == 440
    assert row["prompt_tokens"] == 200


async def test_a_stream_cut_mid_way_is_billed_for_what_was_streamed(
    priced: MakeTeamProxy, wandb: Upstream
):
    proxy = await priced()
    event = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    wandb.fake.stream_script = [event] * 5 + [b"data: [DONE]\n\n"]
    wandb.fake.cut_stream_after = 5  # the upstream's connection is reset after 5 events
    status, body, _ = await chat(proxy, stream=True)
    assert status == 200 and body.count(b'"error"') == 1
    [row] = (await ledger(proxy, team="research"))["data"]
    assert row["estimated_completion_tokens"] == 3  # 5 events, less role and finish
    assert row["cost_micro_usd"] == 2 * row["estimated_prompt_tokens"] + 8 * 3
    assert row["estimated_prompt_tokens"] > 0


async def test_a_stream_the_client_leaves_mid_way_is_billed_for_what_was_streamed(
    priced: MakeTeamProxy, wandb: Upstream
):
    proxy = await priced()
    release = asyncio.Event()
    event = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    wandb.fake.stream_script = [event] * 5 + [release]
    response = await proxy.http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "llama-8b", "messages": [], "stream": True},
        headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
    )
    await response.content.readexactly(5 * len(event))
    response.close()
    async with asyncio.timeout(5):  # settled once the proxy sees the client gone
        while not (rows := (await ledger(proxy, team="research"))["data"]):
            await asyncio.sleep(0.02)
    release.set()
    [row] = rows
    assert row["estimated_completion_tokens"] == 3
    assert row["cost_micro_usd"] == 2 * row["estimated_prompt_tokens"] + 8 * 3


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_a_reloaded_price_bills_the_next_call(
    priced: MakeTeamProxy, wandb: Upstream, prime: Upstream, backend: str
):
    proxy = await priced()
    wandb.fake.faults = [Fault(body=answer(USAGE)), Fault(body=answer(USAGE))]
    await chat(proxy)
    proxy.write_config(
        priced_yaml(wandb, prime, backend).replace(
            "price: {input: 2, output: 8.0, cached_input: 1}", "price: {input: 3, output: 9}"
        )
    )
    await eventually(lambda: proxy.holder.reloads["ok"] >= 1)
    await chat(proxy)
    [row] = (await ledger(proxy, team="research"))["data"]
    assert row["cost_micro_usd"] == (2 * 100 + 8 * 10) + (3 * 100 + 9 * 10)


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_the_usage_command_shows_cost_and_the_split_by_key(
    priced: MakeTeamProxy, wandb: Upstream
):
    proxy = await priced()
    wandb.fake.faults = [Fault(body=answer(USAGE)), Fault(body=answer(USAGE))]
    await chat(proxy)
    await chat(proxy, key=OPS_KEY)
    command = [sys.executable, "-m", "proxy", "usage", "--url", proxy.url]
    env = {**os.environ, "PROXY_ADMIN_KEY": ADMIN_KEY}
    plain, by_key = await asyncio.gather(
        *(
            asyncio.to_thread(
                subprocess.run, args, cwd=ROOT, capture_output=True, timeout=60, env=env
            )
            for args in (command, [*command, "--by-key"])
        )
    )
    assert plain.returncode == by_key.returncode == 0, plain.stderr + by_key.stderr
    lines = plain.stdout.decode().splitlines()
    assert lines[0].split()[-1] == "cost_usd"
    assert [line.split()[-1] for line in lines[1:]] == ["0.000280", "0.000280", "0.000560"]
    lines = by_key.stdout.decode().splitlines()
    assert lines[0].split()[3] == "key"
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[3], r[-1]) for r in rows[:2]] == [
        ("ops", OPS, "0.000280"),
        ("research", RESEARCH, "0.000280"),
    ]
    assert [(r[0], r[1], r[-1]) for r in rows[2:]] == sorted(
        [("total", OPS, "0.000280"), ("total", RESEARCH, "0.000280")]
    )


def test_a_call_s_cost_is_rounded_once_half_to_even():
    """0.15 USD per million tokens is 0.15 µ$ a token: 10 tokens cost 1.5 µ$, booked
    as 2; 30 cost 4.5, booked as 4; 3 cost 0.45, booked as 0. The three parts of a call
    are added before the one rounding: 5 prompt and 5 completion tokens cost 1.5, not
    0.75 + 0.75 rounded apart (1 + 1)."""
    price = Price(input=150_000, output=150_000, cached_input=150_000)
    assert [cost_micros(Usage(n, 0), price) for n in (10, 30, 3)] == [2, 4, 0]
    assert cost_micros(Usage(5, 5), price) == 2
    assert cost_micros(Usage(5, 5), None) == 0
    mixed = Price(input=2_500_000, output=10_000_000, cached_input=1_250_000)
    assert cost_micros(Usage(1000, 100, cached_tokens=400), mixed) == 1500 + 500 + 1000
