"""Budgets end to end, on every backend: a call holds its worst-case cost (the prompt
estimate at the highest input price among its model's targets, max_tokens x n at the
highest output price), is refused with OpenAI's 429 insufficient_quota once a budget
cannot hold it, and settles at what it cost; GET /v1/usage shows a team its own rows
and budgets, the admin every team's. Three proxy processes on one Redis (and on a
Cluster) admit exactly the calls a budget holds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.model import Price
from proxy.limits.cost import worst_case
from proxy.limits.usage import estimate_prompt
from proxy.services import SERVICES
from tests.conftest import MakeProxy, Proxy
from tests.limits.test_costs import priced_yaml
from tests.support import ROOT, ProxyProcess, Upstream, eventually, free_port
from tests.support.metrics import scrape
from tests.support.redis_server import RedisServer
from tests.support.teams import ADMIN_KEY, MESSAGES, OPS_KEY, RESEARCH_KEY, chat, ledger

# Prices in micro-dollars per million tokens: 1 USD per million is 1 µ$ a token.
M = 10**6
PRIME, WANDB_70B, WANDB = (
    Price(1 * M, 2 * M, 1 * M),
    Price(5 * M, 20 * M, 5 * M),
    Price(2 * M, 8 * M, M),
)


def worst(model_prices: list[Price], max_tokens: int, n: int = 1) -> int:
    """What the proxy holds for a call of MESSAGES with ``max_tokens``."""
    prompt = estimate_prompt({"messages": MESSAGES})
    return worst_case(prompt, prompt + max_tokens * n, model_prices)


def budget_yaml(
    wandb: Upstream, prime: Upstream, backend: str, budget: str, models: str = "{}"
) -> str:
    """research gets ``budget`` (and ``models`` as its model_budgets); ops none."""
    return priced_yaml(wandb, prime, backend).replace(
        "    model_limits: {}\n",
        f"    model_limits: {{}}\n    budget: {budget}\n    model_budgets: {models}\n",
        1,
    )


def usd(micros: int) -> str:
    """As the proxy writes an amount: exact, no trailing zeros."""
    return f"{micros / 1_000_000:.6f}".rstrip("0").rstrip(".")


async def usage_as(proxy: Proxy, key: str, **query: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with proxy.http.get(proxy.url + "/v1/usage", params=query, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def budgeted(make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, backend: str):
    made: list[Proxy] = []

    async def make(budget: str, models: str = "{}") -> Proxy:
        proxy = await make_proxy(budget_yaml(wandb, prime, backend, budget, models))
        made.append(proxy)
        return proxy

    yield make
    assert [p.app[SERVICES].accountant.redis_errors for p in made] == [0] * len(made)


async def test_a_budget_holds_the_worst_case_refuses_with_insufficient_quota_and_settles_at_cost(
    budgeted: Any, prime: Upstream
):
    # llama-70b may be served by prime (1 and 2 µ$ a token) or wandb's target (5 and 20):
    # a call holds its prompt at 5 and its max_tokens at 20.
    hold = worst([PRIME, WANDB_70B], 10)
    assert hold == estimate_prompt({"messages": MESSAGES}) * 5 + 10 * 20
    limit = 3 * hold + 7
    proxy = await budgeted(f"{{daily_usd: {usd(limit)}}}")
    status, _, _ = await chat(proxy, model="llama-70b", max_tokens=10)
    assert status == 200
    [served] = prime.fake.reported  # prime served it, at its own price
    cost = served["prompt_tokens"] * 1 + served["completion_tokens"] * 2
    assert 0 < cost < hold
    status, report = await usage_as(proxy, RESEARCH_KEY)
    assert status == 200
    [daily] = report["budgets"]["research"]
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    assert daily == {
        "model": None, "period": "daily",
        "limit_micro_usd": limit, "used_micro_usd": cost, "remaining_micro_usd": limit - cost,
        "limit_usd": limit / 1e6, "used_usd": cost / 1e6, "remaining_usd": (limit - cost) / 1e6,
        "resets_at": f"{tomorrow.isoformat()}T00:00:00Z",
    }  # fmt: skip
    assert report["totals"]["cost_micro_usd"] == cost
    # What is left holds one more call of 10 tokens, not one of ``more`` tokens, which
    # costs more than is left and less than the whole budget.
    left = limit - cost
    more = next(m for m in range(10, 100) if worst([PRIME, WANDB_70B], m) > left)
    assert worst([PRIME, WANDB_70B], more) <= limit and left >= hold
    status, body, headers = await chat(proxy, model="llama-70b", max_tokens=more)
    assert status == 429
    error = json.loads(body)["error"]
    assert error["type"] == error["code"] == "insufficient_quota"
    assert error["param"] == "daily_usd"
    midnight = (time.time() // 86400 + 1) * 86400 - time.time()
    assert abs(int(headers["Retry-After"]) - midnight) < 5
    assert headers["x-budget-reset"] == f"{tomorrow.isoformat()}T00:00:00Z"
    assert headers["x-budget-limit-usd"] == usd(limit)
    assert headers["x-budget-remaining-usd"] == usd(left)
    assert f"daily budget of {usd(limit)} USD" in error["message"]
    assert f"may cost up to {usd(worst([PRIME, WANDB_70B], more))} USD" in error["message"]
    assert f"{usd(left)} USD." in error["message"]
    assert f"resets at {tomorrow.isoformat()}T00:00:00Z" in error["message"]
    assert len(prime.fake.seen) == 1  # refused before any upstream saw it
    # More than the whole budget: told to lower max_tokens.
    status, body, _ = await chat(proxy, model="llama-70b", max_tokens=10_000)
    assert status == 429 and b"Lower max_tokens." in body
    assert (await chat(proxy, model="llama-70b", max_tokens=10))[0] == 200
    # ops has no budget; the gauges show research's as the last admission saw it.
    assert (await chat(proxy, key=OPS_KEY, model="llama-70b", max_tokens=10_000))[0] == 200
    metrics = await scrape(proxy.http, proxy.url)
    labels = {"team": "research", "model": "*", "period": "daily"}
    assert metrics.value("llm_proxy_budget_usd", **labels) == pytest.approx(limit / 1e6)
    assert metrics.value("llm_proxy_budget_used_usd", **labels) == pytest.approx(
        (cost + hold) / 1e6
    )
    assert metrics.value("llm_proxy_rate_limit_rejections_total", team="research",
                         limit="daily_usd") == 2  # fmt: skip


async def test_a_model_s_budget_and_a_monthly_budget(
    budgeted: Any, wandb: Upstream, prime: Upstream
):
    hold = worst([WANDB], 10)
    proxy = await budgeted(
        f"{{monthly_usd: {usd(100 * hold)}}}", f"{{llama-8b: {{daily_usd: {usd(hold)}}}}}"
    )
    wandb.fake.hold = asyncio.Event()  # the first call stays in flight, holding its cost
    first = asyncio.create_task(chat(proxy, max_tokens=10))
    await eventually(lambda: wandb.fake.in_flight == 1)
    status, body, _ = await chat(proxy, max_tokens=10)
    assert status == 429 and b"daily budget of" in body and b"for model 'llama-8b'" in body
    # Another model (served by prime) spends the team's monthly budget only.
    assert (await chat(proxy, model="llama-70b", max_tokens=10))[0] == 200
    wandb.fake.hold.set()
    assert (await first)[0] == 200
    status, report = await usage_as(proxy, RESEARCH_KEY)
    monthly, model_daily = report["budgets"]["research"]
    assert (monthly["period"], monthly["model"]) == ("monthly", None)
    assert (model_daily["period"], model_daily["model"]) == ("daily", "llama-8b")
    [used] = wandb.fake.reported
    llama_8b = 2 * used["prompt_tokens"] + 8 * used["completion_tokens"]
    [by_prime] = prime.fake.reported
    llama_70b = by_prime["prompt_tokens"] + 2 * by_prime["completion_tokens"]
    assert monthly["used_micro_usd"] == llama_8b + llama_70b == report["totals"]["cost_micro_usd"]
    assert model_daily["used_micro_usd"] == llama_8b
    first_of_next = dt.datetime.now(dt.UTC).date().replace(day=28) + dt.timedelta(days=4)
    assert monthly["resets_at"] == f"{first_of_next.replace(day=1).isoformat()}T00:00:00Z"


async def test_a_team_s_key_reads_its_own_usage_and_budgets_and_the_admin_key_every_team_s(
    budgeted: Any,
):
    proxy = await budgeted("{daily_usd: 5}")
    assert (await chat(proxy))[0] == 200
    assert (await chat(proxy, key=OPS_KEY))[0] == 200
    status, own = await usage_as(proxy, RESEARCH_KEY)
    assert status == 200
    assert [row["team"] for row in own["data"]] == ["research"]
    assert list(own["budgets"]) == ["research"]
    assert own["budgets"]["research"][0]["limit_usd"] == 5.0
    status, ops = await usage_as(proxy, OPS_KEY)
    assert status == 200 and [r["team"] for r in ops["data"]] == ["ops"]
    assert ops["budgets"] == {"ops": []}
    status, refused = await usage_as(proxy, OPS_KEY, team="research")
    assert status == 403 and refused["error"]["code"] == "admin_key_required"
    assert "own team's usage only ('ops')" in refused["error"]["message"]
    assert (await usage_as(proxy, RESEARCH_KEY, team="research"))[1] == own
    status, everyone = await usage_as(proxy, ADMIN_KEY)
    assert status == 200
    assert sorted(r["team"] for r in everyone["data"]) == ["ops", "research"]
    assert everyone["budgets"]["research"] == own["budgets"]["research"]
    assert everyone["budgets"]["ops"] == [] and everyone["budgets"]["anonymous"] == []
    assert (await ledger(proxy, team="ops"))["data"] == ops["data"]
    for key in ("sk-proxy-unknown-0123456789", ""):
        assert (await usage_as(proxy, key))[0] == 403


async def _calls(urls: list[str], count: int, body: dict[str, Any], done: list[int]) -> None:
    """``count`` calls at once, spread over ``urls``; each status into ``done`` as it ends."""
    headers = {"Authorization": f"Bearer {RESEARCH_KEY}"}

    async def one(http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
            done.append(resp.status)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(one(http, urls[i % len(urls)]) for i in range(count)))


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
async def test_three_processes_admit_exactly_the_calls_a_budget_holds(
    tmp_path: Path, wandb: Upstream, prime: Upstream, backend: str
):
    hold = worst([WANDB], 20)
    path = tmp_path / "routes.yaml"
    path.write_text(budget_yaml(wandb, prime, backend, f"{{daily_usd: {usd(37 * hold)}}}"))
    processes = [ProxyProcess(path, free_port()) for _ in range(3)]
    wandb.fake.hold = asyncio.Event()  # admitted calls stay in flight: none settles early
    try:
        for process in processes:
            await process.wait_listening()
        body = {"model": "llama-8b", "messages": MESSAGES, "max_tokens": 20}
        statuses: list[int] = []
        calls = asyncio.create_task(_calls([p.url for p in processes], 200, body, statuses))
        # Every call ends refused or is held at the upstream: then count, and let go.
        async with asyncio.timeout(30):
            while len(statuses) + wandb.fake.in_flight < 200:
                await asyncio.sleep(0.05)
            assert wandb.fake.in_flight == 37 and statuses.count(429) == 163
            wandb.fake.hold.set()
            await calls
        assert statuses.count(200) == 37 and statuses.count(429) == 163
        assert not any("redis failed" in p.log() for p in processes)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                processes[0].url + "/v1/usage", params={"team": "research"}, headers=headers
            ) as resp,
        ):
            report = await resp.json()
    finally:
        for process in processes:
            process.stop()
    served = [2 * u["prompt_tokens"] + 8 * u["completion_tokens"] for u in wandb.fake.reported]
    assert len(served) == 37
    assert report["totals"]["cost_micro_usd"] == sum(served) <= 37 * hold
    assert report["totals"]["requests"] == 37
    [daily] = report["budgets"]["research"]
    assert daily["used_micro_usd"] == sum(served)


async def test_a_call_admitted_while_redis_is_down_is_spent_in_redis_once_it_is_back(
    persistent_redis: RedisServer, make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    """fail_open: this process's own limits admit it; once Redis is back, the ledger
    and the budgets there get its cost (they held nothing for it)."""
    proxy = await make_proxy(budget_yaml(wandb, prime, persistent_redis.url, "{daily_usd: 1}"))
    assert (await chat(proxy))[0] == 200
    persistent_redis.kill()
    assert (await chat(proxy))[0] == 200  # admitted by the fallback
    await persistent_redis.restart()
    costs = [2 * u["prompt_tokens"] + 8 * u["completion_tokens"] for u in wandb.fake.reported]
    async with asyncio.timeout(10):
        while True:
            report = (await usage_as(proxy, ADMIN_KEY, team="research"))[1]
            if report["totals"]["requests"] == 2:
                break
            await asyncio.sleep(0.1)
    assert report["totals"]["cost_micro_usd"] == sum(costs)
    assert report["budgets"]["research"][0]["used_micro_usd"] == sum(costs)


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_the_usage_command_with_a_team_s_key_shows_its_budgets(
    budgeted: Any, wandb: Upstream
):
    proxy = await budgeted("{daily_usd: 5, monthly_usd: 100}")
    assert (await chat(proxy))[0] == 200
    [used] = wandb.fake.reported
    cost = 2 * used["prompt_tokens"] + 8 * used["completion_tokens"]
    command = [sys.executable, "-m", "proxy", "usage", "--url", proxy.url]
    result = await asyncio.to_thread(
        subprocess.run, [*command, "--admin-key", RESEARCH_KEY], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ledger_lines, budget_lines = result.stdout.split("\n\n")
    assert "research" in ledger_lines and "ops" not in ledger_lines
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    header, daily, monthly = (line.split() for line in budget_lines.splitlines())
    assert header == ["team", "model", "period", "limit_usd", "used_usd", "remaining_usd",
                      "resets_at"]  # fmt: skip
    assert daily == [
        "research", "*", "daily", "5.000000", f"0.{cost:06d}", f"4.{1_000_000 - cost:06d}",
        f"{tomorrow.isoformat()}T00:00:00Z",
    ]  # fmt: skip
    assert monthly[:4] == ["research", "*", "monthly", "100.000000"]


async def test_a_restarted_proxy_restores_what_its_budgets_spent_from_the_ledger_file(
    tmp_path: Path, wandb: Upstream, prime: Upstream
):
    """Without Redis, what a budget spent is read off the ledger rows: the rows the
    ledger file gives back at start restore it, with no state of its own."""
    path = tmp_path / "routes.yaml"
    ledger_file = tmp_path / "ledger.sqlite3"
    path.write_text(
        budget_yaml(wandb, prime, "", "{daily_usd: 1, monthly_usd: 10}").replace(
            "accounting: {default_max_tokens: 50}",
            f"accounting: {{default_max_tokens: 50, ledger_path: '{ledger_file}'}}",
        )
    )
    body = {"model": "llama-8b", "messages": MESSAGES}
    statuses: list[int] = []
    first = ProxyProcess(path, free_port())
    try:
        await first.wait_listening()
        await _calls([first.url], 2, body, statuses)
    finally:
        assert first.stop() == 0  # SIGTERM: the ledger file written
    assert statuses == [200, 200]
    spent = sum(2 * u["prompt_tokens"] + 8 * u["completion_tokens"] for u in wandb.fake.reported)
    second = ProxyProcess(path, free_port())
    try:
        await second.wait_listening()
        headers = {"Authorization": f"Bearer {RESEARCH_KEY}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(second.url + "/v1/usage", headers=headers) as resp,
        ):
            report = await resp.json()
    finally:
        second.stop()
    assert report["ledger"]["store"] == "sqlite"
    assert report["totals"]["cost_micro_usd"] == spent
    daily, monthly = report["budgets"]["research"]
    assert daily["used_micro_usd"] == monthly["used_micro_usd"] == spent > 0
