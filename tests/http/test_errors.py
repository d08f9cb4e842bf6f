"""The proxy's own errors in the OpenAI shape; upstream errors relayed as sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from tests.conftest import MakeProxy, Proxy
from tests.support import Upstream, dead_url, routes_yaml
from tests.support.fake_upstream import Fault

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


async def _post(proxy: Proxy, data: Any = None, **kwargs: Any) -> tuple[int, Any]:
    async with proxy.http.post(proxy.url + CHAT, data=data, **kwargs) as resp:
        return resp.status, await resp.json()


def _assert_shape(body: dict[str, Any], type_: str, code: str | None) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": "llama-8b"}', "messages"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"model": "llama-8b", "messages": "hi"}', "messages"),
        (b'{"model": "llama-8b", "messages": [], "stream": "yes"}', "stream"),
        (b'{"model": "llama-8b", "messages": [], "max_tokens": true}', "max_tokens"),
        (b'{"model": "llama-8b", "messages": ["\xff"]}', None),
        (b'{"model": "llama-8b", "messages": ' + b"[" * 50000 + b"]" * 50000 + b"}", None),
    ],
)
async def test_bad_requests_get_400(proxy: Proxy, wandb: Upstream, raw: bytes, param: str | None):
    status, body = await _post(proxy, raw, headers={"Content-Type": "application/json"})
    assert status == 400
    _assert_shape(body, "invalid_request_error", None)
    assert body["error"]["param"] == param
    assert not wandb.fake.seen


async def test_unknown_model_404_names_available(proxy: Proxy):
    status, body = await _post(proxy, json={"model": "gpt-17", "messages": MESSAGES})
    assert status == 404
    _assert_shape(body, "invalid_request_error", "model_not_found")
    assert "gpt-17" in body["error"]["message"]
    assert "llama-70b, llama-8b, same-name" in body["error"]["message"]


async def test_body_over_limit_413(proxy: Proxy, wandb: Upstream):
    config = proxy.holder.current
    proxy.holder.current = replace(config, server=replace(config.server, max_body_bytes=1000))
    big = {"model": "llama-8b", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, body = await _post(proxy, json=big)
    assert status == 413
    _assert_shape(body, "invalid_request_error", "request_too_large")

    # Chunked, with no Content-Length: the limit still holds while reading.
    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 200

    status, body = await _post(proxy, trickle())
    assert status == 413
    assert not wandb.fake.seen


async def test_upstream_error_relayed_as_sent(proxy: Proxy, wandb: Upstream):
    wandb.fake.status = 400
    wandb.fake.error_body = {
        "error": {
            "message": "Context length exceeded",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    status, body = await _post(proxy, json={"model": "llama-8b", "messages": MESSAGES})
    assert status == 400
    assert body == wandb.fake.error_body
    assert len(wandb.fake.seen) == 1


async def test_fallback_to_next_target_on_429(proxy: Proxy, wandb: Upstream, prime: Upstream):
    prime.fake.status = 429
    prime.fake.error_body = {
        "error": {
            "message": "Rate limit exceeded",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
        }
    }
    status, body = await _post(proxy, json={"model": "llama-70b", "messages": MESSAGES})
    assert status == 200
    assert body["model"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert len(prime.fake.seen) == 1 and len(wandb.fake.seen) == 1


async def test_all_targets_failing_names_what_each_answered(
    proxy: Proxy, wandb: Upstream, prime: Upstream
):
    prime.fake.status = 503
    prime.fake.error_body = {"error": {"message": "prime overloaded", "type": "server_error"}}
    wandb.fake.status = 429
    wandb.fake.error_headers = {"Retry-After": "7"}
    wandb.fake.error_body = {
        "error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}
    }
    async with proxy.http.post(
        proxy.url + CHAT, json={"model": "llama-70b", "messages": MESSAGES}
    ) as resp:
        status, body, retry_after = resp.status, await resp.json(), resp.headers["Retry-After"]
    # The last answer's status, type, code and Retry-After; every target in the message.
    assert (status, retry_after) == (429, "7")
    _assert_shape(body, "rate_limit_error", "rate_limit_exceeded")
    assert "prime: HTTP 503 prime overloaded" in body["error"]["message"]
    assert "wandb: HTTP 429 slow down" in body["error"]["message"]


async def test_single_provider_error_relayed_as_sent(proxy: Proxy, wandb: Upstream):
    wandb.fake.status = 500
    wandb.fake.error_body = {"error": {"message": "wandb is down", "type": "server_error"}}
    status, body = await _post(proxy, json={"model": "llama-8b", "messages": MESSAGES})
    assert (status, body) == (500, wandb.fake.error_body)


async def test_unreachable_upstream_502(make_proxy: MakeProxy, wandb: Upstream):
    dead = Upstream(wandb.fake, dead_url())
    proxy = await make_proxy(routes_yaml(dead, dead))
    status, body = await _post(proxy, json={"model": "llama-70b", "messages": MESSAGES})
    assert status == 502
    _assert_shape(body, "server_error", "upstream_unreachable")
    assert "prime" in body["error"]["message"] and "wandb" in body["error"]["message"]


async def test_upstream_timeout_504(proxy: Proxy, wandb: Upstream):
    wandb.fake.pause_before_headers = 10  # first_byte is 3s in the test routes
    status, body = await _post(proxy, json={"model": "llama-8b", "messages": MESSAGES})
    assert status == 504
    _assert_shape(body, "server_error", "upstream_timeout")


async def test_missing_key_named_and_others_keep_working(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, wandb: Upstream, prime: Upstream
):
    monkeypatch.delenv("TEST_PRIME_KEY")
    text = routes_yaml(
        wandb, prime, extra="  prime-only:\n    targets:\n      - {provider: prime, model: m}\n"
    )
    proxy = await make_proxy(text)
    assert any("TEST_PRIME_KEY" in w for w in proxy.holder.current.warnings)
    status, body = await _post(proxy, json={"model": "prime-only", "messages": MESSAGES})
    assert status == 503
    _assert_shape(body, "server_error", "provider_unavailable")
    assert "TEST_PRIME_KEY" in body["error"]["message"]
    # llama-70b falls back past the keyless provider; llama-8b never needed it.
    for model in ("llama-70b", "llama-8b"):
        status, _ = await _post(proxy, json={"model": model, "messages": MESSAGES})
        assert status == 200
    assert not prime.fake.seen


async def test_unknown_path_and_method_are_openai_shaped(proxy: Proxy):
    async with proxy.http.get(proxy.url + "/v1/nothing") as resp:
        assert resp.status == 404
        _assert_shape(await resp.json(), "invalid_request_error", "not_found")
    async with proxy.http.get(proxy.url + CHAT) as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["llama-8b", "llama-70b"])
async def test_broken_200_on_every_attempt_is_502_bad_upstream_response(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, model: str, stream: bool
):
    proxy = await make_proxy(routes_yaml(wandb, prime, retry="{attempts: 2, base_delay: 1ms}"))
    fault = Fault(invalid_sse=True) if stream else Fault(malformed_json=True)
    for fake in (wandb.fake, prime.fake):
        fake.faults = [fault] * 2
    payload = {"model": model, "messages": MESSAGES, "stream": stream}
    status, body = await _post(proxy, json=payload)
    assert status == 502
    _assert_shape(body, "server_error", "bad_upstream_response")
    tried = [fake.name for fake in (prime.fake, wandb.fake) if fake.seen]
    assert tried == (["prime", "wandb"] if model == "llama-70b" else ["wandb"])
    for fake in (wandb.fake, prime.fake):
        assert len(fake.seen) in (0, 2)  # every attempt, and nothing more
        assert f"{fake.name}:" in body["error"]["message"] or not fake.seen


async def test_every_endpoint_cooling_down_is_503_circuit_open(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    circuit = "circuit: {failures: 1, cooldown: 60s, max_cooldown: 60s}\n"
    proxy = await make_proxy(circuit + routes_yaml(wandb, prime))
    wandb.fake.status = prime.fake.status = 500
    status, _ = await _post(proxy, json={"model": "llama-70b", "messages": MESSAGES})
    assert status == 500  # both answered: the last answer's status; both circuits open now
    status, body = await _post(proxy, json={"model": "llama-70b", "messages": MESSAGES})
    assert status == 503
    _assert_shape(body, "server_error", "circuit_open")
    assert "prime" in body["error"]["message"] and "wandb" in body["error"]["message"]
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (1, 1)  # none called again


async def test_a_provider_s_circuit_overrides_the_top_level_one(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    # Top level: 100 failures open a circuit; wandb's own: one failure does.
    wandb_timeouts = "    timeouts: {connect: 2s, first_byte: 3s, idle: 2s, total: 20s}\n"
    text = "circuit: {failures: 100, cooldown: 60s, max_cooldown: 60s}\n" + routes_yaml(
        wandb, prime
    ).replace(wandb_timeouts, wandb_timeouts + "    circuit: {failures: 1, cooldown: 60s}\n", 1)
    proxy = await make_proxy(text)
    wandb.fake.status = prime.fake.status = 500
    for model in ("llama-8b", "llama-70b"):  # wandb fails once; prime once, wandb not again
        status, _ = await _post(proxy, json={"model": model, "messages": MESSAGES})
        assert status == 500
    status, body = await _post(proxy, json={"model": "llama-8b", "messages": MESSAGES})
    assert status == 503 and body["error"]["code"] == "circuit_open"
    prime.fake.status = 200
    status, _ = await _post(proxy, json={"model": "llama-70b", "messages": MESSAGES})
    assert status == 200  # prime's circuit, under the top-level policy, stayed closed
    assert (len(prime.fake.seen), len(wandb.fake.seen)) == (2, 1)
