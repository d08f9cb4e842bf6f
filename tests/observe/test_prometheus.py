"""A real Prometheus scrapes a real proxy under load; every panel and alert is evaluated.

The proxy runs as ``python -m proxy serve --workers 2`` on a free port in front of
the fake upstreams and a real llama.cpp engine (SmolLM2, one per worker); Prometheus
(Debian's package) scrapes it every second under the job name of
deploy/prometheus.yml, with deploy/alerts.yml loaded. A short load of successes,
upstream errors, fallbacks, streams, local-engine calls, a 404 and a refused and an
accepted reload passes through in four rounds, so every series has at least two
samples. The load also has retries (prime answers 503),
an endpoint whose circuit opens (nothing listens), a team over its rate limit, and a
private Redis that is killed and restarted (fail_open). Then each query of each
dashboard panel is sent through Prometheus's HTTP API, its variables ($team, $model,
$provider) set to All, and must return data; a few are sent again with one value
chosen, as an operator narrowing the dashboard would, and the variables' own lists
must hold the values the load produced.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.call.auth import key_hash
from proxy.engines.llamacpp import model_path
from tests.support import ProxyProcess, Upstream, dead_url, free_port, routes_yaml
from tests.support.deploy_files import (
    ALERTS,
    DEPLOY,
    alert_rules,
    dashboard,
    grafana_to_promql,
    panel_queries,
    proxy_job,
    template_variables,
)
from tests.support.engines import MODEL, engine_yaml
from tests.support.metrics import scrape
from tests.support.prometheus import PrometheusServer, binary
from tests.support.redis_server import RedisServer
from tests.support.teams import RESEARCH_KEY, need_redis, team_yaml

TIGHT_KEY = "sk-proxy-tight-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]
STREAM = {"stream": True, "stream_options": {"include_usage": True}}
# The job deploy/prometheus.yml gives the proxy, which deploy/alerts.yml matches.
JOB = proxy_job(DEPLOY / "prometheus.yml")


class Load:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.sent = 0  # proxied API calls, what llm_proxy_requests_total must add up to

    async def call(
        self, path: str, payload: dict[str, Any], status: int | set[int], key: str = RESEARCH_KEY
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(self.url + path, json=payload, headers=headers) as resp:
            await resp.read()
            assert resp.status in ({status} if isinstance(status, int) else status), (
                await resp.text()
            )
        self.sent += 1

    async def round(self) -> None:
        chat = "/v1/chat/completions"
        for _ in range(3):
            await self.call(chat, {"model": "llama-8b", "messages": MESSAGES}, 200)
        await self.call(chat, {"model": "llama-70b", "messages": MESSAGES}, 200)  # falls back
        await self.call(chat, {"model": "llama-8b", "messages": MESSAGES, **STREAM}, 200)
        await self.call(chat, {"model": "llama-70b", "messages": MESSAGES, **STREAM}, 200)
        await self.call("/v1/embeddings", {"model": "llama-8b", "input": "hi"}, 200)
        # the local engine: tokens that llama.cpp itself counts
        await self.call(chat, {"model": "smollm2", "messages": MESSAGES, "max_tokens": 4}, 200)
        await self.call(chat, {"model": "not-configured", "messages": MESSAGES}, 404)
        # 502 the first time, then 503 while its circuit is open
        await self.call(chat, {"model": "broken", "messages": MESSAGES}, {502, 503})
        for _ in range(2):  # the team "tight" may make one call a minute
            await self.call(
                chat, {"model": "llama-8b", "messages": MESSAGES}, {200, 429}, key=TIGHT_KEY
            )


def _routes(wandb: Upstream, prime: Upstream, redis_url: str) -> str:
    dead = dead_url()  # nothing listens: 502 upstream_unreachable, then its circuit opens
    extra = "  broken:\n    targets: [{provider: dead, model: x}]\n" + _smollm2_model()
    text = routes_yaml(wandb, prime, extra=extra, retry="{attempts: 2, base_delay: 10ms}")
    text = text.replace(
        "providers:\n",
        f"providers:\n  dead: {{base_url: '{dead}', circuit: {{failures: 1, cooldown: 1m}}}}\n"
        + _engine_provider(),
        1,
    )
    text = text.replace(  # /readyz probes prime: endpoint health gets a value
        "    headers: {X-Prime-Team-ID: team-42}\n",
        "    headers: {X-Prime-Team-ID: team-42}\n    required: true\n",
    )
    twin = wandb.url.replace("127.0.0.1", "localhost")  # the same fake, by another name
    text = text.replace(  # cache_aware over two endpoints: the prefix-hit panel gets a value
        f"    base_url: {wandb.url}\n",
        f"    endpoints: ['{wandb.url}', '{twin}']\n    balance: cache_aware\n",
    )
    text = text.replace(  # wandb's calls cost something: the cost panel gets a value
        "    headers: {OpenAI-Project: acme/research}\n",
        "    headers: {OpenAI-Project: acme/research}\n    price: {input: 1, output: 2}\n",
    )
    tight = f"""  tight:
    keys: ["{key_hash(TIGHT_KEY)}"]
    limits: {{requests_per_minute: 1}}
"""
    # research has a budget: the budget panel and alert read its gauges.
    budget = "{}\n    budget: {daily_usd: 1000}\n    model_budgets: {llama-8b: {monthly_usd: 9}}"
    teams = team_yaml(
        limits="{requests_per_minute: 10000}", model_limits=budget, redis_url=redis_url
    )
    return text + teams + tight


def _engine_provider() -> str:
    """The provider ``local`` of tests/support/engines.py: llama.cpp with --metrics, one
    thread (each of the two workers runs its own)."""
    text = engine_yaml(threads=1)
    return text[text.index("  local:\n") : text.index("models:")]


def _smollm2_model() -> str:
    text = engine_yaml()
    return text[text.index("  smollm2:\n") :].rstrip() + "\n"


def _prometheus_config(proxy_port: int) -> str:
    return f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{ALERTS}"]
scrape_configs:
  - job_name: {JOB}
    static_configs: [{{targets: ["127.0.0.1:{proxy_port}"]}}]
"""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_dashboard_and_alerts_against_a_real_prometheus(
    tmp_path: Path, wandb: Upstream, prime: Upstream, http: aiohttp.ClientSession
) -> None:
    binary("prometheus")
    need_redis()
    await asyncio.to_thread(model_path, MODEL)  # downloaded once, before any timeout runs
    prime.fake.status = 503  # every llama-70b call is retried on prime, then falls back
    wandb.fake.chunk_pause = 0.01  # stream chunks arrive apart: chunk gaps get samples
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    config = tmp_path / "routes.yaml"
    config.write_text(_routes(wandb, prime, redis.url))
    proxy = ProxyProcess(config, free_port(), "--workers", "2")
    prometheus = PrometheusServer(tmp_path, _prometheus_config(proxy.port))
    try:
        await proxy.wait_listening(workers=2)
        await prometheus.wait_ready(http)
        await _run_load(Load(http, proxy.url), prometheus, config, http, redis)
        await _wait_rules_evaluated(prometheus, http)
        await _check_panels(prometheus, http)
        await _check_narrowed_panels(prometheus, http)
        await _check_variables(prometheus, http)
        await _check_alerts(prometheus, http)
    finally:
        prometheus.stop()
        assert proxy.stop() == 0
        redis.kill()


async def _run_load(
    load: Load, prometheus: PrometheusServer, config: Path, http: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    await load.round()
    redis.kill()  # fail_open: calls go on, Redis errors are counted
    await load.round()
    await redis.restart()
    async with http.get(load.url + "/readyz") as resp:
        assert resp.status == 200
    good = _swap(config, "models: [not, valid]\n")
    await _until_proxy_has(http, load.url, result="error")
    _swap(config, good)
    await _until_proxy_has(http, load.url, result="ok")
    await _until_prometheus_counted(prometheus, http, load.sent)
    await load.round()  # a second sample of every series, with new observations
    await load.round()
    await _until_prometheus_counted(prometheus, http, load.sent)


def _swap(config: Path, text: str) -> str:
    old = config.read_text()
    config.write_text(text)
    return old


async def _until_proxy_has(http: aiohttp.ClientSession, url: str, result: str) -> None:
    deadline = time.monotonic() + 20
    while (await scrape(http, url)).value("llm_proxy_config_reloads_total", result=result) < 1:
        assert time.monotonic() < deadline, f"no reload with result {result}"
        await asyncio.sleep(0.1)


async def _until_prometheus_counted(
    prometheus: PrometheusServer, http: aiohttp.ClientSession, sent: int
) -> None:
    """Wait for a scrape that saw every call so far, summed over both workers."""
    deadline = time.monotonic() + 30
    while True:
        answer = await prometheus.query(http, "sum(llm_proxy_requests_total)")
        result = answer["data"]["result"]
        if result and float(result[0]["value"][1]) == sent:
            return
        assert time.monotonic() < deadline, f"Prometheus never saw {sent} calls: {answer}"
        await asyncio.sleep(0.2)


async def _wait_rules_evaluated(prometheus: PrometheusServer, http: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 30
    while True:
        groups = (await prometheus.api(http, "rules"))["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, "Prometheus did not evaluate the alert rules"
        await asyncio.sleep(0.2)
    assert len(rules) == len(alert_rules())
    bad = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not bad, bad


async def _check_panels(prometheus: PrometheusServer, http: aiohttp.ClientSession) -> None:
    empty = []
    for query in panel_queries():
        answer = await prometheus.query(http, grafana_to_promql(query.expr))
        assert answer["status"] == "success", f"{query.panel}: {query.expr}: {answer}"
        if not answer["data"]["result"]:
            empty.append(f"{query.panel}: {query.expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


async def _series(
    prometheus: PrometheusServer, http: aiohttp.ClientSession, panel: str, **chosen: str
) -> list[dict[str, Any]]:
    """What one panel's first query returns with the dashboard's variables as chosen."""
    [expr] = [p["targets"][0]["expr"] for p in dashboard()["panels"] if p["title"] == panel]
    answer = await prometheus.query(http, grafana_to_promql(expr, chosen=chosen))
    assert answer["status"] == "success", f"{panel}: {answer}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def _check_narrowed_panels(prometheus: PrometheusServer, http: aiohttp.ClientSession) -> None:
    # llama-8b never failed: its 5xx ratio is 0, not "No data"; "broken" always fails.
    ratio = await _series(prometheus, http, "5xx ratio by model", model="llama-8b")
    assert [(r["metric"], float(r["value"][1])) for r in ratio] == [({"model": "llama-8b"}, 0.0)]
    ratio = await _series(prometheus, http, "5xx ratio by model", model="broken")
    assert [(r["metric"], float(r["value"][1])) for r in ratio] == [({"model": "broken"}, 1.0)]
    teams = await _series(prometheus, http, "Requests per second by team", team="tight")
    assert [r["metric"] for r in teams] == [{"team": "tight"}]
    # Budgets: the team's own and a model's, each a share of its limit.
    used = await _series(prometheus, http, "Budget used (%)", team="research")
    assert sorted((r["metric"]["model"], r["metric"]["period"]) for r in used) == [
        ("*", "daily"),
        ("llama-8b", "monthly"),
    ]
    assert all(0 < float(r["value"][1]) < 1 for r in used)
    assert await _series(prometheus, http, "Budget used (%)", team="tight") == []
    # An engine is a provider: the provider variable narrows the engine panels too.
    engines = await _series(prometheus, http, "llama.cpp tokens per second", provider="local")
    assert [r["metric"] for r in engines] == [{"engine": "local"}]
    assert await _series(prometheus, http, "llama.cpp tokens per second", provider="wandb") == []


async def _check_variables(prometheus: PrometheusServer, http: aiohttp.ClientSession) -> None:
    """Each variable lists what label_values(series, label) finds: Prometheus's label API."""
    expected = {
        "team": {"research", "tight"},
        "model": {"llama-8b", "llama-70b", "smollm2", "broken", "unknown"},
        "provider": {"wandb", "prime", "local", "dead"},  # prime: tried, never answered
    }
    for name, variable in template_variables().items():
        if variable["type"] != "query":
            continue
        series, label = re.fullmatch(
            r"label_values\((\w+), (\w+)\)", variable["query"]["query"]
        ).groups()  # type: ignore[union-attr]
        answer = await prometheus.api(http, f"label/{label}/values", **{"match[]": series})
        assert set(answer["data"]) == expected[name], name


async def _check_alerts(prometheus: PrometheusServer, http: aiohttp.ClientSession) -> None:
    for rule in alert_rules():
        answer = await prometheus.query(http, rule["expr"])
        assert answer["status"] == "success", f"{rule['alert']}: {answer}"
        if rule["alert"] in ("LLMProxyDown", "LLMProxyAbsent"):  # the proxy is up
            assert answer["data"]["result"] == [], rule["alert"]
    down = await prometheus.query(http, f'up{{job="{JOB}"}}')
    assert [float(r["value"][1]) for r in down["data"]["result"]] == [1.0]
