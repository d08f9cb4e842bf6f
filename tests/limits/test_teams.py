"""Teams: keys, limits, rate-limit headers and the ledger, on both backends."""

from __future__ import annotations

import asyncio
import calendar
import json
import time
from typing import Any

import pytest

from proxy.limits.memory import MemoryStore
from proxy.limits.store import Admission, Check
from tests.conftest import MakeProxy
from tests.support import Upstream, routes_yaml
from tests.support.fake_upstream import Fault
from tests.support.redis_server import RedisServer
from tests.support.teams import (
    ADMIN_KEY,
    OPS_KEY,
    RESEARCH_KEY,
    MakeTeamProxy,
    chat,
    ledger,
    team_yaml,
)


async def test_keys_are_required_and_checked(team_proxy: MakeTeamProxy, wandb: Upstream):
    proxy = await team_proxy()
    for key in (None, "sk-proxy-wrong", RESEARCH_KEY[:-1]):
        status, body, _ = await chat(proxy, key=key)
        assert status == 401
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert not wandb.fake.seen
    status, _, _ = await chat(proxy, key=RESEARCH_KEY)
    assert status == 200
    seen = wandb.fake.last.headers
    assert seen["OpenAI-Project"] == "acme/research-team"  # the team's, over the provider's
    assert RESEARCH_KEY not in json.dumps(dict(seen))


async def test_requests_per_minute_refuses_with_retry_after(team_proxy: MakeTeamProxy):
    proxy = await team_proxy(limits="{requests_per_minute: 3}")
    remaining = []
    for _ in range(3):
        status, _, headers = await chat(proxy)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    status, body, headers = await chat(proxy)
    assert status == 429
    error = json.loads(body)["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "rate_limit_error",
        "rate_limit_exceeded",
        "requests_per_minute",
    )
    retry = int(headers["Retry-After"])
    assert 1 <= retry <= 20  # one request refills in 20 s
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # The refused limit's reset is when this call fits: Retry-After, before rounding up
    # (not when the bucket is full again, 60 s away).
    reset = _seconds(headers["x-ratelimit-reset-requests"])
    assert retry - 1 < reset <= retry
    assert error["message"] == (
        "Rate limit exceeded: the team's requests_per_minute limit of 3 is used up. "
        f"Retry in {retry}s."
    )
    status, _, _ = await chat(proxy, key=OPS_KEY)  # another team is not affected
    assert status == 200


def _seconds(duration: str) -> float:
    """OpenAI's reset durations (``20ms``, ``19.95s``, ``1m0s``) in seconds."""
    if duration.endswith("ms"):
        return float(duration[:-2]) / 1000
    minutes, _, secs = duration.removesuffix("s").rpartition("m")
    return float(minutes or 0) * 60 + float(secs)


async def test_every_answer_names_its_call_and_a_stream_carries_the_limits(
    team_proxy: MakeTeamProxy,
):
    proxy = await team_proxy(limits="{requests_per_minute: 3}")
    status, body, headers = await chat(proxy, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert len(headers["X-Proxy-Request-Id"]) == 32
    assert headers["x-ratelimit-remaining-requests"] == "2"  # set before the stream began
    status, _, headers = await chat(proxy, model="no-such-model")
    assert status == 404 and len(headers["X-Proxy-Request-Id"]) == 32
    status, _, headers = await chat(proxy, key="sk-proxy-wrong")
    assert status == 401 and len(headers["X-Proxy-Request-Id"]) == 32


async def test_tokens_are_reserved_then_corrected(team_proxy: MakeTeamProxy, wandb: Upstream):
    # Each call reserves its prompt estimate (14) + max_tokens 40 = 54 and uses what the
    # upstream reports (15 + 6 = 21): the settlement hands 33 back. Four calls then fit
    # in 120 (120 - 3·21 = 57 ≥ 54); without the correction only two would.
    proxy = await team_proxy(limits="{tokens_per_minute: 120}")
    statuses = [(await chat(proxy, max_tokens=40))[0] for _ in range(5)]
    assert statuses == [200] * 4 + [429]
    assert sum(u["prompt_tokens"] + u["completion_tokens"] for u in wandb.fake.reported) == 84
    status, _, headers = await chat(proxy, max_tokens=500)
    assert status == 429  # can never fit in 120 tokens a minute
    assert headers["x-ratelimit-limit-tokens"] == "120"


@pytest.mark.parametrize("lease_ttl, held_for", [("60s", 0.0), ("500ms", 1.5)])
async def test_concurrency_slots(
    team_proxy: MakeTeamProxy, wandb: Upstream, lease_ttl: str, held_for: float
):
    """A slot is a lease that expires after lease_ttl, so that a proxy that dies frees
    its slots; a live call renews its own for as long as it runs (held_for: three lease
    lifetimes, less than the upstream idle timeout)."""
    proxy = await team_proxy(limits="{concurrent: 1}", lease_ttl=lease_ttl)
    release = asyncio.Event()
    wandb.fake.stream_script = [b"data: {}\n\n", release, b"data: [DONE]\n\n"]
    held = await proxy.http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "llama-8b", "messages": [], "stream": True},
        headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
    )
    assert held.status == 200
    await asyncio.sleep(held_for)
    status, body, _ = await chat(proxy)
    assert status == 429 and json.loads(body)["error"]["param"] == "concurrent"
    release.set()
    await held.read()
    held.close()
    wandb.fake.stream_script = None
    status, _, _ = await chat(proxy)
    assert status == 200


async def test_back_to_back_calls_at_the_concurrency_limit_all_pass(team_proxy: MakeTeamProxy):
    """The answer no longer waits for its settlement's round trip, yet the slot it held
    is free before the same client's next call asks for it, and the proxy's own ledger
    read includes every call answered before it."""
    proxy = await team_proxy(limits="{concurrent: 1}")
    statuses = [(await chat(proxy))[0] for _ in range(30)]
    assert statuses == [200] * 30
    assert (await ledger(proxy, team="research"))["totals"]["requests"] == 30


async def test_model_limits_apply_to_their_model_only(team_proxy: MakeTeamProxy):
    proxy = await team_proxy(model_limits="{llama-70b: {requests_per_minute: 1}}")
    assert (await chat(proxy, model="llama-70b"))[0] == 200
    status, body, _ = await chat(proxy, model="llama-70b")
    assert status == 429 and "llama-70b" in json.loads(body)["error"]["message"]
    assert (await chat(proxy, model="llama-8b"))[0] == 200


async def test_tokens_per_day(team_proxy: MakeTeamProxy):
    proxy = await team_proxy(limits="{tokens_per_day: 100}")
    assert (await chat(proxy, max_tokens=40))[0] == 200
    status, body, headers = await chat(proxy, max_tokens=90)
    assert status == 429
    assert json.loads(body)["error"]["param"] == "tokens_per_day"
    # Refused until the next UTC midnight (both backends' clocks are this machine's).
    to_midnight = 86400 - time.time() % 86400
    assert abs(int(headers["Retry-After"]) - to_midnight) <= 2


def test_tokens_per_day_roll_over_at_utc_midnight():
    now = [float(calendar.timegm((2026, 12, 4, 23, 59, 59)))]  # one second before UTC midnight
    store = MemoryStore(clock=lambda: now[0])
    daily = (Check("*", "tokens_per_day", 100),)

    def admit(tokens: int) -> Admission:
        return asyncio.run(store.admit(store.prepare("research", daily), tokens, "lease", 60.0))

    first = admit(90)
    assert first.admitted and first.day == 20791  # 2026-12-04 in days since the epoch
    refused = admit(20)
    assert not refused.admitted and refused.retry_after == 1.0
    now[0] += 1.0  # 2026-12-05T00:00:00Z
    fresh = admit(20)
    assert fresh.admitted and fresh.day == 20792
    assert fresh.states[0].remaining == 80 and fresh.states[0].reset == 86400.0


async def test_the_day_of_a_redis_limit_is_the_utc_day_on_redis_s_clock(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, shared_redis: RedisServer
):
    client = shared_redis.client()
    client.flushall()
    proxy = await make_proxy(
        routes_yaml(wandb, prime)
        + team_yaml(limits="{tokens_per_day: 1000}", redis_url=shared_redis.url)
    )
    assert (await chat(proxy))[0] == 200
    seconds, _ = client.time()
    keys = [k.decode() if isinstance(k, bytes) else k for k in client.keys("*tpd*")]
    client.close()
    assert [k.rsplit(":", 1)[1] for k in keys] == [str(seconds // 86400)], keys


async def test_reservation_is_max_completion_tokens_times_n(team_proxy: MakeTeamProxy):
    proxy = await team_proxy(limits="{tokens_per_minute: 1000}")
    # 3 x 400 tokens cannot fit in 1000, whatever the (small) prompt.
    status, body, _ = await chat(proxy, max_completion_tokens=400, n=3)
    assert status == 429
    error = json.loads(body)["error"]
    assert error["param"] == "tokens_per_minute" and "max_tokens" in error["message"]
    # 2 x 400 fits and leaves 200 less the prompt's estimate (a few tokens).
    status, _, headers = await chat(proxy, max_completion_tokens=400, n=2)
    assert status == 200
    assert 150 <= int(headers["x-ratelimit-remaining-tokens"]) < 200


async def test_ledger_books_what_the_upstream_reported(
    team_proxy: MakeTeamProxy, wandb: Upstream, prime: Upstream
):
    proxy = await team_proxy()
    await chat(proxy)
    await chat(proxy, stream=True)  # the proxy asks for usage and strips it again
    prime.fake.status = 503  # llama-70b falls back to wandb: billed once, wandb's usage
    await chat(proxy, model="llama-70b")
    await chat(proxy, key=OPS_KEY)
    report = await ledger(proxy, team="research")
    rows = {row["model"]: row for row in report["data"]}
    assert set(rows) == {"llama-8b", "llama-70b"}
    reported = wandb.fake.reported[:3]
    assert report["totals"]["requests"] == 3
    assert report["totals"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in reported)
    assert report["totals"]["completion_tokens"] == sum(u["completion_tokens"] for u in reported)
    assert report["totals"]["estimated_completion_tokens"] == 0
    everyone = await ledger(proxy)
    assert everyone["totals"]["requests"] == 4


async def test_stream_is_byte_identical_with_and_without_injected_usage(
    team_proxy: MakeTeamProxy, make_proxy, wandb: Upstream, prime: Upstream
):
    injected = await team_proxy()
    _, with_injection, _ = await chat(injected, stream=True)
    assert b'"stream_options"' in wandb.fake.last.body  # the proxy did ask
    assert b"usage" not in with_injection
    from tests.support import routes_yaml
    from tests.support.teams import team_yaml

    plain = await make_proxy(
        routes_yaml(wandb, prime).replace(
            "    headers: {OpenAI-Project: acme/research}\n",
            "    headers: {OpenAI-Project: acme/research}\n    stream_usage: false\n",
        )
        + team_yaml()
    )
    _, without, _ = await chat(plain, stream=True)
    assert b'"stream_options"' not in wandb.fake.last.body
    assert with_injection == without
    # A client that asks for usage itself gets it, as sent.
    _, asked, _ = await chat(injected, stream=True, stream_options={"include_usage": True})
    assert b'"usage": {"prompt_tokens"' in asked


async def test_missing_usage_is_estimated_and_kept_apart(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy()
    wandb.fake.send_usage = False
    await chat(proxy)
    await chat(proxy, stream=True)
    totals = (await ledger(proxy, team="research"))["totals"]
    assert totals["requests"] == 2
    assert totals["prompt_tokens"] == totals["completion_tokens"] == 0
    assert totals["estimated_prompt_tokens"] > 0 and totals["estimated_completion_tokens"] > 0


async def test_tokens_streamed_before_a_disconnect_are_billed(
    team_proxy: MakeTeamProxy, wandb: Upstream
):
    proxy = await team_proxy()
    release = asyncio.Event()
    wandb.fake.stream_script = [b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'] * 5 + [
        release
    ]
    response = await proxy.http.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "llama-8b", "messages": [], "stream": True},
        headers={"Authorization": f"Bearer {RESEARCH_KEY}"},
    )
    await response.content.readexactly(5 * 46)
    response.close()
    for _ in range(100):
        totals = (await ledger(proxy, team="research"))["totals"]
        if totals["requests"]:
            break
        await asyncio.sleep(0.05)
    assert totals["requests"] == 1
    assert totals["estimated_completion_tokens"] == 3  # 5 events, less role and finish


async def test_usage_endpoint_needs_the_admin_key_or_a_team_s(team_proxy: MakeTeamProxy):
    """A team's key reads its own team's (tests/limits/test_budgets.py); no key, or
    any other, is refused."""
    proxy = await team_proxy()
    for key in (None, RESEARCH_KEY + "x", ADMIN_KEY + "x"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with proxy.http.get(proxy.url + "/v1/usage", headers=headers) as resp:
            assert resp.status == 403
    async with proxy.http.get(
        proxy.url + "/v1/usage",
        params={"from": "yesterday"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as resp:
        assert resp.status == 400


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_anonymous_without_teams(make_proxy, wandb: Upstream, prime: Upstream, backend):
    from tests.support import routes_yaml

    proxy = await make_proxy(routes_yaml(wandb, prime) + "admin_key: k\n")
    async with proxy.http.post(
        proxy.url + "/v1/chat/completions", json={"model": "llama-8b", "messages": []}
    ) as resp:
        assert resp.status == 200
        assert "x-ratelimit-limit-requests" not in resp.headers
    async with proxy.http.get(
        proxy.url + "/v1/usage", headers={"Authorization": "Bearer k"}
    ) as resp:
        assert (await resp.json())["data"][0]["team"] == "anonymous"


def test_serve_refuses_anonymous_on_a_public_address(tmp_path):
    import subprocess
    import sys

    from tests.support import ROOT

    path = tmp_path / "routes.yaml"
    path.write_text(
        "providers: {p: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "models: {m: {targets: [{provider: p, model: x}]}}\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--allow-anonymous" in result.stderr


@pytest.mark.parametrize("backend", ["memory"], indirect=True)
async def test_usage_command_prints_the_ledger(team_proxy: MakeTeamProxy, backend):
    import os
    import subprocess
    import sys

    from tests.support import ROOT

    proxy = await team_proxy()
    await chat(proxy)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "usage", "--url", proxy.url, "--team", "research"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PROXY_ADMIN_KEY": ADMIN_KEY},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.decode().splitlines()
    assert lines[0].split()[:4] == ["date", "team", "model", "requests"]
    assert lines[1].split()[1:4] == ["research", "llama-8b", "1"]
    assert lines[-1].split()[:2] == ["total", "1"]
    # Without the admin key: the proxy's refusal, and how to pass the key.
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "usage", "--url", proxy.url],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PROXY_ADMIN_KEY"},
    )
    assert refused.returncode == 1
    err = refused.stderr.decode()
    assert "HTTP 401" in err or "HTTP 403" in err, err
    assert "pass it with --admin-key KEY or PROXY_ADMIN_KEY=KEY" in err
    assert '{"error"' not in err  # the message, not the raw body


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10**30, "completion_tokens": 5},
        {"prompt_tokens": 7, "completion_tokens": -1_000_000},
        {"prompt_tokens": True, "completion_tokens": 5},
    ],
    ids=["huge", "negative", "bool"],
)
async def test_a_usage_no_upstream_can_mean_is_estimated_not_booked(
    team_proxy: MakeTeamProxy, wandb: Upstream, usage: dict[str, Any]
):
    """An upstream's usage must not break the ledger (a count Redis cannot add would
    leave the settlement queued, and every one behind it) nor take tokens back."""
    proxy = await team_proxy()
    message = {"role": "assistant", "content": "four words of text"}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    answer = {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage}
    wandb.fake.faults = [Fault(body=json.dumps(answer).encode())]
    status, _, _ = await chat(proxy)
    assert status == 200
    status, _, _ = await chat(proxy)  # an honest answer after it is booked as reported
    assert status == 200
    totals = (await ledger(proxy, team="research"))["totals"]
    assert totals["requests"] == 2
    honest = wandb.fake.reported[-1]
    assert totals["prompt_tokens"] == honest["prompt_tokens"]
    assert totals["completion_tokens"] == honest["completion_tokens"]
    assert totals["estimated_prompt_tokens"] > 0 and totals["estimated_completion_tokens"] > 0
