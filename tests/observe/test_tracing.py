"""OpenTelemetry traces, exported to a real OTLP/HTTP receiver that decodes the protobuf
(tests/support/otlp_receiver.py): a span per call with the GenAI attributes, a child per
attempt, W3C traceparent from the client and to the upstream, flushed at shutdown."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.server import Serving
from tests.conftest import StartApp
from tests.support import Upstream, routes_yaml, serve_app
from tests.support.fake_upstream import Fault
from tests.support.otlp_receiver import CLIENT, ERROR, SERVER, UNSET, OtlpReceiver

CHAT = {"model": "llama-8b", "messages": [{"role": "user", "content": "hi"}]}
UPSTREAM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # routes_yaml's llama-8b on wandb
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def _traced_proxy(
    start_app: StartApp, wandb: Upstream, prime: Upstream, tmp_path: Path, ratio: float = 1.0
) -> tuple[OtlpReceiver, web.AppRunner | Serving, str]:
    """A receiver, and a proxy exporting to it (stopped by the test: its shutdown flushes)."""
    receiver = OtlpReceiver()
    collector = await start_app(receiver.app())
    telemetry = (
        f"telemetry: {{otlp_endpoint: '{collector}', service_name: proxy-under-test, "
        f"sample_ratio: {ratio}}}\n"
    )
    retry = "{attempts: 2, base_delay: 1ms, max_delay: 1ms}"
    path = tmp_path / "routes.yaml"
    path.write_text(routes_yaml(wandb, prime, retry=retry) + telemetry)
    proxy, url = await serve_app(make_app(ConfigHolder(load_config(path), path)))
    return receiver, proxy, url


async def _post(url: str, body: Mapping[str, object], headers: dict[str, str] | None = None) -> str:
    """The call's request id, once its whole answer (a stream to its end) is in."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as answer,
    ):
        await answer.read()
        assert answer.status == 200
        return answer.headers["X-Proxy-Request-Id"]


def _parsed(traceparent: str) -> tuple[str, str, bool]:
    """Trace id, parent span id, sampled (W3C Trace Context: version 00, flags' bit 0)."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


async def test_a_call_is_a_span_with_the_genai_attributes_and_a_child_span_per_attempt(
    start_app: StartApp, wandb: Upstream, prime: Upstream, tmp_path: Path
):
    receiver, proxy, url = await _traced_proxy(start_app, wandb, prime, tmp_path)
    wandb.fake.faults = [Fault(status=500)]  # the plain call's first attempt fails
    plain = await _post(url, CHAT)
    streamed = await _post(url, {**CHAT, "stream": True})
    # The export's batch waits up to 5 s by default: the shutdown must flush it.
    await proxy.cleanup()
    assert set(receiver.content_types) == {"application/x-protobuf"}
    calls = {s.attributes["proxy.request_id"]: s for s in receiver.of_kind(SERVER)}
    assert set(calls) == {plain, streamed}
    assert len(receiver.of_kind(CLIENT)) == 3  # two attempts, then one
    usage = wandb.fake.reported  # what the ledger booked: the upstream's usage
    assert usage == [{"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}] * 2
    for call in calls.values():
        assert call.name == "chat llama-8b"
        assert call.parent_span_id == ""  # no traceparent came with it: a trace of its own
        assert call.resource["service.name"] == "proxy-under-test"
        assert call.status_code == UNSET
        assert {k: v for k, v in call.attributes.items() if k.startswith("gen_ai.")} == {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "llama-8b",
            "gen_ai.response.model": UPSTREAM_MODEL,
            "gen_ai.provider.name": "wandb",
            "gen_ai.usage.input_tokens": 8,
            "gen_ai.usage.output_tokens": 6,
        }
        assert call.attributes["http.response.status_code"] == 200
        assert call.attributes["proxy.tokens_estimated"] is False

    failed, answered = receiver.children(calls[plain])
    assert (failed.kind, failed.status_code, failed.attributes["error.type"]) == (
        CLIENT,
        ERROR,
        "500",
    )
    assert failed.attributes["http.response.status_code"] == 500
    assert (answered.status_code, answered.attributes["http.response.status_code"]) == (UNSET, 200)
    assert "error.type" not in answered.attributes
    assert answered.attributes["gen_ai.provider.name"] == "wandb"
    assert answered.attributes["url.full"] == f"{wandb.url}/chat/completions"
    (stream_attempt,) = receiver.children(calls[streamed])
    # Each request upstream carried its own attempt's span, in the call's trace.
    sent = [_parsed(seen.headers["traceparent"]) for seen in wandb.fake.seen]
    expected = [(span.trace_id, span.span_id, True) for span in (failed, answered, stream_attempt)]
    assert sent == expected


async def test_a_client_traceparent_is_the_parent_and_its_sampling_decision_is_kept(
    start_app: StartApp, wandb: Upstream, prime: Upstream, tmp_path: Path
):
    """sample_ratio 0 traces no call of its own, but a client's sampled trace is traced."""
    receiver, proxy, url = await _traced_proxy(start_app, wandb, prime, tmp_path, ratio=0)
    unsampled_trace = "0af7651916cd43dd8448eb211c80319c"
    traced = await _post(url, CHAT, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    await _post(url, CHAT)  # no traceparent: the ratio (0) decides
    await _post(url, CHAT, {"traceparent": f"00-{unsampled_trace}-{CLIENT_SPAN}-00"})
    await proxy.cleanup()

    (call,) = receiver.of_kind(SERVER)
    assert call.attributes["proxy.request_id"] == traced
    assert (call.trace_id, call.parent_span_id) == (CLIENT_TRACE, CLIENT_SPAN)
    (attempt,) = receiver.of_kind(CLIENT)
    assert attempt.parent_span_id == call.span_id
    first, root, unsampled = (_parsed(seen.headers["traceparent"]) for seen in wandb.fake.seen)
    # The upstream is told the proxy's attempt, not the client's span; and, for the
    # calls not traced, the same trace (or a new one) marked not sampled.
    assert first == (CLIENT_TRACE, attempt.span_id, True)
    assert root[0] not in (CLIENT_TRACE, unsampled_trace) and root[2] is False
    assert (unsampled[0], unsampled[2]) == (unsampled_trace, False)
    assert unsampled[1] != CLIENT_SPAN


async def test_a_call_that_fails_is_a_span_in_error_with_each_failed_attempt(
    start_app: StartApp, wandb: Upstream, prime: Upstream, tmp_path: Path
):
    receiver, proxy, url = await _traced_proxy(start_app, wandb, prime, tmp_path)
    statuses = []
    for status in (503, 400):  # a server error, retried; a client error, relayed at once
        wandb.fake.status = status
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{url}/v1/chat/completions", json=CHAT) as answer,
        ):
            await answer.read()
            statuses.append(answer.status)
    await proxy.cleanup()
    assert statuses == [503, 400]  # the last upstream answer, relayed
    calls = {s.attributes["http.response.status_code"]: s for s in receiver.of_kind(SERVER)}
    failed, refused = calls[503], calls[400]
    assert (failed.status_code, failed.attributes["error.type"]) == (ERROR, "503")
    assert failed.attributes["gen_ai.provider.name"] == "wandb"
    assert "gen_ai.response.model" not in failed.attributes
    attempts = receiver.children(failed)
    assert [(a.status_code, a.attributes["error.type"]) for a in attempts] == [(ERROR, "503")] * 2
    # A 4xx is the client's: no error of the proxy's server span, but of the client span.
    assert refused.status_code == UNSET
    (attempt,) = receiver.children(refused)
    assert (attempt.status_code, attempt.attributes["error.type"]) == (ERROR, "400")


async def test_a_stream_broken_after_its_first_byte_is_a_span_in_error(
    start_app: StartApp, wandb: Upstream, prime: Upstream, tmp_path: Path
):
    receiver, proxy, url = await _traced_proxy(start_app, wandb, prime, tmp_path)
    wandb.fake.faults = [Fault(reset_after_first=True)]
    request_id = await _post(url, {**CHAT, "stream": True})  # 200: its head went out
    await proxy.cleanup()
    (call,) = receiver.of_kind(SERVER)
    assert call.attributes["proxy.request_id"] == request_id
    assert call.attributes["http.response.status_code"] == 200
    assert (call.status_code, call.attributes["error.type"]) == (ERROR, "stream_error")
    assert call.status_message.startswith("Provider 'wandb'")
