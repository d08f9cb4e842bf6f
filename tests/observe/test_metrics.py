"""GET /metrics counts what passed through, with labels only from routes.yaml."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from proxy.limits.usage import Usage, reported
from proxy.observe.metrics import Metrics, endpoint_label
from tests.conftest import PRIME_KEY, WANDB_KEY, MakeProxy, Proxy
from tests.support import Upstream, routes_yaml, serve_app
from tests.support.fake_upstream import FakeUpstream
from tests.support.metrics import scrape

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
CLIENT_KEY = "sk-proxy-client-key-0123456789"


async def post(proxy: Proxy, payload: dict[str, object], key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with proxy.http.post(proxy.url + CHAT, json=payload, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_calls_are_counted_by_model_provider_and_status(
    proxy: Proxy, prime: Upstream
) -> None:
    assert await post(proxy, {"model": "llama-8b", "messages": MESSAGES}) == 200
    prime.fake.status = 503  # llama-70b falls back from prime to wandb
    assert await post(proxy, {"model": "llama-70b", "messages": MESSAGES}) == 200
    assert await post(proxy, {"model": "no-such-model-xyz", "messages": MESSAGES}) == 404
    m = await scrape(proxy.http, proxy.url)
    requests = "llm_proxy_requests_total"
    assert m.value(requests, model="llama-8b", provider="wandb", status="200") == 1
    assert m.value(requests, model="llama-70b", provider="wandb", team="anonymous") == 1
    assert m.value(requests, model="unknown", provider="none", status="404") == 1
    assert "no-such-model-xyz" not in m.text  # a client's string never becomes a label
    attempts = "llm_proxy_upstream_attempts_total"
    assert m.value(attempts, provider="prime", outcome="failed") == 1
    assert m.value(attempts, provider="wandb", outcome="ok") == 2
    assert m.value("llm_proxy_request_duration_seconds_count", model="llama-70b") == 1
    assert m.value("llm_proxy_overhead_seconds_count") == 3
    assert m.value("llm_proxy_requests_in_flight") == 0
    tokens = "llm_proxy_tokens_total"
    assert m.value(tokens, model="llama-8b", kind="completion", source="reported") == 6
    assert m.value(tokens, model="llama-8b", kind="prompt", source="reported") > 0


async def test_streams_record_first_token_chunk_gaps_and_usage(proxy: Proxy) -> None:
    payload = {
        "model": "llama-8b",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert await post(proxy, payload) == 200
    m = await scrape(proxy.http, proxy.url)
    assert m.value("llm_proxy_time_to_first_token_seconds_count", model="llama-8b") == 1
    assert m.value("llm_proxy_stream_chunk_gap_seconds_count", provider="wandb") >= 1
    tokens = "llm_proxy_tokens_total"
    assert m.value(tokens, model="llama-8b", kind="completion", source="reported") == 6


async def test_reloads_are_counted_by_result(proxy: Proxy, wandb: Upstream, prime: Upstream):
    proxy.write_config("models: [not, valid]\n")
    assert not proxy.holder.reload()
    proxy.write_config(routes_yaml(wandb, prime))
    assert proxy.holder.reload()
    m = await scrape(proxy.http, proxy.url)
    assert m.value("llm_proxy_config_reloads_total", result="error") == 1
    assert m.value("llm_proxy_config_reloads_total", result="ok") == 1


async def test_readyz_probes_set_endpoint_health(make_proxy: MakeProxy, wandb: Upstream):
    # A required provider of the test's own, so that the test can stop it.
    fake = FakeUpstream(prefix="/api/v1", key=PRIME_KEY, name="prime")
    runner, url = await serve_app(fake.app())
    prime = Upstream(fake, url + "/api/v1")
    text = routes_yaml(wandb, prime).replace(
        "    headers: {X-Prime-Team-ID: team-42}\n",
        "    headers: {X-Prime-Team-ID: team-42}\n    required: true\n",
    )
    proxy = await make_proxy(text)
    # The label is the configured URL as written (it has no credentials to drop).
    label = {"provider": "prime", "endpoint": f"{url}/api/v1"}
    async with proxy.http.get(proxy.url + "/readyz") as resp:
        assert resp.status == 200
    assert (await scrape(proxy.http, proxy.url)).value("llm_proxy_endpoint_up", **label) == 1
    await runner.cleanup()  # prime goes away
    async with asyncio.timeout(5):  # once the last probe (shared for a second) is stale
        while True:
            async with proxy.http.get(proxy.url + "/readyz") as resp:
                if resp.status == 503:
                    break
            await asyncio.sleep(0.05)
    assert (await scrape(proxy.http, proxy.url)).value("llm_proxy_endpoint_up", **label) == 0


async def test_access_log_names_the_call_and_never_a_key(
    proxy: Proxy, wandb: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.access")
    assert await post(proxy, {"model": "llama-8b", "messages": MESSAGES}, CLIENT_KEY) == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]
    assert len(lines) == 1
    line = lines[0]
    assert (line["team"], line["key"]) == ("anonymous", None)
    assert (line["model"], line["provider"], line["status"]) == ("llama-8b", "wandb", 200)
    assert (line["api"], line["endpoint"]) == ("chat/completions", wandb.url)
    assert line["attempts"] == [
        {"provider": "wandb", "endpoint": wandb.url, "outcome": "ok", "detail": "200"}
    ]
    assert line["completion_tokens"] == 6 and line["prompt_tokens"] > 0
    assert line["duration_ms"] > 0 and len(line["request_id"]) == 32
    assert "ttft_ms" in line
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    m = await scrape(proxy.http, proxy.url)
    for secret in (CLIENT_KEY, WANDB_KEY, PRIME_KEY):
        assert secret not in logged
        assert secret not in m.text


async def test_in_flight_counts_a_call_while_it_runs(proxy: Proxy, wandb: Upstream) -> None:
    release = asyncio.Event()
    wandb.fake.stream_script = [b"data: 1\n\n", release, b"data: [DONE]\n\n"]
    payload = {"model": "llama-8b", "messages": MESSAGES, "stream": True}
    async with proxy.http.post(proxy.url + CHAT, json=payload) as resp:
        await resp.content.readany()
        assert (await scrape(proxy.http, proxy.url)).value("llm_proxy_requests_in_flight") == 1
        release.set()
        await resp.read()
    assert (await scrape(proxy.http, proxy.url)).value("llm_proxy_requests_in_flight") == 0


async def test_a_client_that_goes_away_is_counted_as_499(proxy: Proxy, wandb: Upstream) -> None:
    wandb.fake.stream_script = [b"data: 1\n\n", 30.0, b"data: [DONE]\n\n"]
    payload = {"model": "llama-8b", "messages": MESSAGES, "stream": True}
    async with proxy.http.post(proxy.url + CHAT, json=payload) as resp:
        await resp.content.readany()
        resp.close()
    async with asyncio.timeout(5):  # the handler is being cancelled
        while (await scrape(proxy.http, proxy.url)).value("llm_proxy_requests_in_flight"):
            await asyncio.sleep(0.05)
    m = await scrape(proxy.http, proxy.url)
    assert m.value("llm_proxy_requests_total", model="llama-8b", status="499") == 1


def test_recording_functions_for_later_features() -> None:
    metrics = Metrics()
    metrics.rate_limit_rejected("research", "tokens_per_minute")
    metrics.redis_call("admit", 0.002)
    with pytest.raises(ConnectionError), metrics.redis_timer("admit"):
        raise ConnectionError("redis went away")
    metrics.circuit_changed("wandb", "https://api.example/v1", "open")
    metrics.attempt("wandb", "retried")
    metrics.add_tokens("research", "llama-8b", 10, 0, "estimated")
    text = metrics.scrape().decode()
    assert (
        'llm_proxy_rate_limit_rejections_total{limit="tokens_per_minute",team="research"}' in text
    )
    assert 'llm_proxy_redis_errors_total{operation="admit"} 1.0' in text
    assert 'llm_proxy_redis_latency_seconds_count{operation="admit"} 2.0' in text
    assert 'llm_proxy_circuit_state{endpoint="https://api.example/v1",provider="wandb"} 2.0' in text
    assert 'outcome="retried"' in text and 'source="estimated"' in text
    assert "llm_proxy_requests_total" in metrics.series_names()


async def test_a_tally_writes_what_the_library_s_own_calls_write() -> None:
    """The hot path's updates reach prometheus-client through a tally (observe/tally.py),
    which adds histogram observations through the library's value objects: the result
    must be what its own observe(), inc() and dec() write."""
    tallied, direct = Metrics(), Metrics()
    # On bounds, between them, below the first and beyond the last.
    for seconds in (0.0, 0.00005, 0.0001, 0.00017, 0.7, 1.0, 30.0, 299.9, 5000.0):
        tallied.c_duration.get("t", "m", "p").observe(seconds)
        direct.duration.labels("t", "m", "p").observe(seconds)
        tallied.c_overhead.observe(seconds / 1000)
        direct.overhead.observe(seconds / 1000)
        tallied.c_chunk_gap.get("p").observe(seconds)
        direct.chunk_gap.labels("p").observe(seconds)
        tallied.redis_call("settle", seconds / 100)
        direct.redis_latency.labels("settle").observe(seconds / 100)
    for amount in (1, 1, 250):
        tallied.c_tokens.get("t", "m", "prompt", "reported").inc(amount)
        direct.tokens.labels("t", "m", "prompt", "reported").inc(amount)
    tallied.c_in_flight.inc()
    tallied.c_in_flight.inc()
    tallied.c_in_flight.dec()
    direct.in_flight.inc()
    assert b"le=" in direct.render() and b"reported" in direct.render()
    assert _samples(tallied.render()) != _samples(direct.render())  # nothing added yet
    assert _samples(tallied.scrape()) == _samples(direct.render())


def _samples(text: bytes) -> list[bytes]:
    """The exposition without the series' creation times, which differ by registry, and
    without each worker's own figures (its CPU time, when its config loaded)."""
    return [
        line for line in text.splitlines() if b"_created" not in line and b'worker="' not in line
    ]


def test_endpoint_label_drops_credentials_and_query() -> None:
    assert endpoint_label("https://u:p@host.example:8443/v1/?k=s") == "https://host.example:8443/v1"


@pytest.mark.parametrize(
    ("payload", "usage"),
    [
        ({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, Usage(3, 4)),
        ({"data": [], "usage": {"prompt_tokens": 2, "total_tokens": 2}}, Usage(2, 0)),
        ({"usage": None}, None),
        ({"usage": {"prompt_tokens": "3"}}, None),
        # the largest count an upstream can mean is booked; one more is estimated
        ({"usage": {"prompt_tokens": 2**31 - 1, "completion_tokens": 0}}, Usage(2**31 - 1, 0)),
        ({"usage": {"prompt_tokens": 0, "completion_tokens": 2**31 - 1}}, Usage(0, 2**31 - 1)),
        ({"usage": {"prompt_tokens": 2**31, "completion_tokens": 0}}, None),
        ({"id": "x"}, None),
        ([1, 2], None),
    ],
)
def test_reported_usage(payload: object, usage: Usage | None) -> None:
    assert reported(payload) == usage
