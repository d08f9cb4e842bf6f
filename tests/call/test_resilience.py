"""Retries, backoff, Retry-After, budgets and fallback against a fault-injecting upstream."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import replace
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest

from proxy.app import make_app
from proxy.config.load import parse_config
from proxy.config.model import Endpoint, RetryPolicy
from proxy.config.reload import ConfigHolder
from proxy.routing.backoff import backoff_delay, retry_after_seconds
from tests.conftest import MakeProxy, Proxy, StartApp
from tests.support import Upstream, eventually, routes_yaml
from tests.support.fake_upstream import OK, REPLY, FakeUpstream, Fault

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
PLAIN = {"model": "llama-8b", "messages": MESSAGES}
STREAM = {**PLAIN, "stream": True}
RETRY = "{attempts: 3, base_delay: 100ms, max_delay: 200ms, max_retry_after: 2s}"
SLACK = 0.4  # scheduling slack on a loaded 2-core machine; bounds, not speed


@pytest.fixture
async def proxy(make_proxy: MakeProxy, wandb: Upstream, prime: Upstream) -> Proxy:
    text = routes_yaml(wandb, prime, retry=RETRY)
    return await make_proxy(
        text.replace("first_byte: 3s", "first_byte: 500ms").replace("idle: 2s", "idle: 500ms")
    )


def gaps(fake: FakeUpstream) -> list[float]:
    return [b - a for a, b in zip(fake.arrivals, fake.arrivals[1:], strict=False)]


async def _call(proxy: Proxy, payload: dict[str, Any], **kwargs: Any) -> tuple[int, bytes, Any]:
    async with proxy.http.post(proxy.url + CHAT, json=payload, **kwargs) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def test_429_retry_after_seconds_is_honoured(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(status=429, retry_after="1")]
    status, body, _ = await _call(proxy, PLAIN)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == REPLY
    assert len(wandb.fake.seen) == 2
    assert 1.0 <= gaps(wandb.fake)[0] < 1.0 + SLACK


async def test_429_retry_after_http_date_is_honoured(proxy: Proxy, wandb: Upstream):
    wall, mono = time.time(), time.monotonic()
    date = math.floor(wall + 2)  # what the header says: an HTTP date has 1 s resolution
    wandb.fake.faults = [Fault(status=503, retry_after=formatdate(date, usegmt=True))]
    status, _, _ = await _call(proxy, PLAIN)
    assert status == 200
    # Not retried before the date (on the monotonic clock the fake records, to 5 ms),
    # nor much after it.
    assert wandb.fake.arrivals[1] >= mono + (date - wall) - 0.005
    assert gaps(wandb.fake)[0] < 2.0 + SLACK


async def test_retry_after_above_maximum_falls_back_without_sleeping(
    proxy: Proxy, wandb: Upstream, prime: Upstream
):
    prime.fake.faults = [Fault(status=429, retry_after="30")]
    status, body, _ = await _call(proxy, {**PLAIN, "model": "llama-70b"})
    assert status == 200 and json.loads(body)["model"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (1, 1)
    # Far from the behaviour ruled out, which would wait 30 s.
    assert wandb.fake.arrivals[0] - prime.fake.arrivals[0] < 30 / 2


async def test_retry_after_beyond_the_callers_budget_falls_back(
    proxy: Proxy, wandb: Upstream, prime: Upstream
):
    prime.fake.faults = [Fault(status=429, retry_after="1")]
    status, _, _ = await _call(
        proxy, {**PLAIN, "model": "llama-70b"}, headers={"X-Request-Timeout": "0.5"}
    )
    assert status == 200
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (1, 1)
    # Sleeping would take the Retry-After's 1 s; falling back at once stays inside the budget.
    assert wandb.fake.arrivals[0] - prime.fake.arrivals[0] < 0.5


async def test_500_is_retried_with_full_jitter_then_relayed(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(status=500)] * 3
    status, body, _ = await _call(proxy, PLAIN)
    assert status == 500 and json.loads(body)["error"]["message"] == "fault 500"
    assert len(wandb.fake.seen) == 3
    first, second = gaps(wandb.fake)
    assert first < 0.1 + SLACK and second < 0.2 + SLACK  # full jitter under base·2^(n-1)


def test_full_jitter_spreads_over_the_whole_range():
    # 400 draws per retry number: uniform on [0, ceiling) has its mean at half the ceiling
    # (standard error 1.4 % of it) and about a quarter of the draws in each quarter.
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=0.3)
    for number, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)):
        draws = [backoff_delay(policy, number) for _ in range(400)]
        assert all(0 <= d <= ceiling for d in draws), number
        assert abs(statistics.fmean(draws) / ceiling - 0.5) < 0.08, number
        quarters = Counter(min(3, int(4 * d / ceiling)) for d in draws)
        assert all(60 <= quarters[q] <= 140 for q in range(4)), (number, quarters)


def test_a_retry_after_date_counts_from_now_and_one_past_is_no_wait():
    now = 1_800_000_000.0
    assert retry_after_seconds(formatdate(now + 10, usegmt=True), now=now) == 10.0
    assert retry_after_seconds(formatdate(now - 60, usegmt=True), now=now) == 0.0


# A Retry-After that does not parse is ignored: the wait is full jitter, as for a 500.
@pytest.mark.parametrize(
    "fault", [Fault(status=500), Fault(status=429, retry_after="soon")], ids=["500", "429-soon"]
)
async def test_backoff_waits_are_drawn_not_fixed(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, fault: Fault
):
    # 20 retries, each waiting uniformly in [0, 300 ms): some waits must be short and
    # some long (each fails by chance with probability 2^-20). A wait of zero, or of
    # the ceiling every time, fails one of the two.
    ceiling = 0.3
    retry = "{attempts: 21, base_delay: 300ms, max_delay: 300ms}"
    circuit = "circuit: {failures: 100, cooldown: 1s, max_cooldown: 1s}\n"  # stays closed
    proxy = await make_proxy(circuit + routes_yaml(wandb, prime, retry=retry))
    wandb.fake.faults = [fault] * 20
    status, _, _ = await _call(proxy, PLAIN)
    assert status == 200
    waits = gaps(wandb.fake)
    assert len(waits) == 20
    assert min(waits) < ceiling / 2 < max(waits)


async def test_503_exhausts_attempts_then_falls_back(
    proxy: Proxy, wandb: Upstream, prime: Upstream
):
    prime.fake.faults = [Fault(status=503)] * 3
    status, _, _ = await _call(proxy, {**PLAIN, "model": "llama-70b"})
    assert status == 200
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (3, 1)


async def test_hang_times_out_every_attempt(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(hang=True)] * 3
    status, body, _ = await _call(proxy, PLAIN)
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert len(wandb.fake.seen) == 3
    await eventually(lambda: len(wandb.fake.cancelled_at) == 3)  # each one was closed


async def test_slow_first_token_is_retried_before_any_byte(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(first_token_delay=2.0)]
    status, body, _ = await _call(proxy, STREAM)
    assert status == 200
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in body.decode().split("\n\n")
        if line.startswith("data: {")
    )
    assert text == REPLY and body.count(b"[DONE]") == 1
    assert len(wandb.fake.seen) == 2


async def test_reset_mid_stream_is_not_retried(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(reset_after_first=True)]
    status, body, _ = await _call(proxy, STREAM)
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert events[0] == b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}'
    assert len(events) == 2 and b'"error"' in events[1]
    assert len(wandb.fake.seen) == 1


@pytest.mark.parametrize("fault", [Fault(malformed_json=True), Fault(invalid_sse=True)])
async def test_broken_200_is_retried(proxy: Proxy, wandb: Upstream, fault: Fault):
    wandb.fake.faults = [fault]
    payload = STREAM if fault.invalid_sse else PLAIN
    status, body, _ = await _call(proxy, payload)
    assert status == 200 and b"<html>" not in body and REPLY.split()[0].encode() in body
    assert len(wandb.fake.seen) == 2


async def test_client_errors_are_never_retried(proxy: Proxy, wandb: Upstream, prime: Upstream):
    prime.fake.faults = [Fault(status=400)]
    status, _, _ = await _call(proxy, {**PLAIN, "model": "llama-70b"})
    assert status == 400
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (1, 0)


async def test_every_attempt_is_in_the_access_log(
    proxy: Proxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy.access")
    prime.fake.faults = [Fault(status=503), Fault(status=429, retry_after="60")]
    wandb.fake.faults = [OK]
    status, _, _ = await _call(proxy, {**PLAIN, "model": "llama-70b"})
    assert status == 200
    line = json.loads(caplog.records[-1].getMessage())
    assert [(a["provider"], a["outcome"], a["detail"]) for a in line["attempts"]] == [
        ("prime", "retried", "503"),
        ("prime", "failed", "429"),
        ("wandb", "ok", "200"),
    ]


async def test_no_log_line_carries_userinfo_of_an_endpoint_url(
    start_app: StartApp, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    # The config is built here, not loaded: whether the loader lets userinfo into a URL
    # or not, the access log must not write it out.
    text = routes_yaml(wandb, prime, retry="{attempts: 2, base_delay: 10ms}")
    config = parse_config(text, os.environ)
    secret = wandb.url.replace("http://", "http://user:s3cret-pw@")
    providers = dict(config.providers)
    providers["wandb"] = replace(providers["wandb"], endpoints=(Endpoint(secret),))
    app = make_app(ConfigHolder(replace(config, providers=providers)))
    url = await start_app(app)
    caplog.set_level(logging.INFO)
    wandb.fake.faults = [Fault(status=503)]
    async with aiohttp.ClientSession() as http, http.post(url + CHAT, json=PLAIN) as resp:
        assert resp.status == 200
    line = json.loads([r for r in caplog.records if r.name == "proxy.access"][-1].getMessage())
    assert [a["endpoint"] for a in line["attempts"]] == [wandb.url, wandb.url]
    assert line["endpoint"] == wandb.url
    assert "s3cret-pw" not in caplog.text


DEEP = b"[" * 100_000 + b"]" * 100_000  # parses in no JSON parser with a recursion limit


async def test_json_nested_too_deeply_is_a_bad_answer_and_retried(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(body=DEEP)]
    status, body, _ = await _call(proxy, PLAIN)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == REPLY
    assert len(wandb.fake.seen) == 2


async def test_json_nested_too_deeply_on_every_attempt_is_a_502(proxy: Proxy, wandb: Upstream):
    wandb.fake.faults = [Fault(body=DEEP)] * 3
    status, body, _ = await _call(proxy, PLAIN)
    assert (status, json.loads(body)["error"]["code"]) == (502, "bad_upstream_response")
    assert len(wandb.fake.seen) == 3


async def test_error_answers_nested_too_deeply_are_still_named(
    proxy: Proxy, wandb: Upstream, prime: Upstream
):
    prime.fake.faults = [Fault(status=503, body=DEEP)] * 3
    wandb.fake.faults = [Fault(status=503, body=DEEP)] * 3
    status, body, _ = await _call(proxy, {**PLAIN, "model": "llama-70b"})
    assert status == 503
    assert json.loads(body)["error"]["message"].startswith("All targets of model 'llama-70b'")


async def test_a_deeply_nested_stream_event_is_relayed(proxy: Proxy, wandb: Upstream):
    event = b'data: {"usage": ' + DEEP + b"}\n\n"  # "usage" in it: the tap parses it
    wandb.fake.stream_script = [event, b"data: [DONE]\n\n"]
    status, body, _ = await _call(proxy, STREAM)
    assert status == 200 and body == event + b"data: [DONE]\n\n"


# An unparseable Retry-After is ignored (full jitter applies, and the retry succeeds);
# one beyond max_retry_after (2s here) moves on at once, and this model has no other
# target, so the 429 is relayed; one in the past means now.
@pytest.mark.parametrize(
    ("retry_after", "status", "calls"),
    [
        ("\u00b2", 200, 2),
        ("\u0663", 200, 2),
        ("-5", 200, 2),
        ("nan", 200, 2),
        ("inf", 200, 2),
        ("-inf", 200, 2),
        ("1e3", 200, 2),
        ("1.5", 200, 2),
        ("soon", 200, 2),
        ("Wed, 01 Jan 99999 00:00:00 GMT", 200, 2),
        ("Sun, 06 Nov 1994 08:49:37 +9999", 200, 2),
        ("Mon, 01 Jan 0001 00:00:00 GMT", 200, 2),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 200, 2),
        ("9" * 400, 429, 1),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 429, 1),
    ],
)
async def test_any_retry_after_is_survived(
    proxy: Proxy, wandb: Upstream, retry_after: str, status: int, calls: int
):
    wandb.fake.faults = [Fault(status=429, retry_after=retry_after)]
    got, _, headers = await _call(proxy, PLAIN)
    assert (got, len(wandb.fake.seen)) == (status, calls)
    if status == 429:
        assert headers["Retry-After"] == retry_after


async def test_a_model_s_retry_fields_win_over_its_provider_s(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    wandb_timeouts = "    timeouts: {connect: 2s, first_byte: 3s, idle: 2s, total: 20s}\n"
    text = routes_yaml(
        wandb,
        prime,
        retry="{attempts: 1}",
        extra=(
            "  patient:\n    retry: {attempts: 3}\n"
            "    targets:\n      - {provider: wandb, model: patient-upstream}\n"
        ),
    ).replace(wandb_timeouts, wandb_timeouts + "    retry: {attempts: 2, base_delay: 1ms}\n", 1)
    proxy = await make_proxy(text)
    for model, attempts in (("llama-8b", 2), ("patient", 3)):  # the provider's, the model's
        wandb.fake.seen.clear()
        wandb.fake.faults = [Fault(status=500)] * 3
        status, _, _ = await _call(proxy, {**PLAIN, "model": model})
        assert (status, len(wandb.fake.seen)) == (500, attempts), model
