"""Local engines end to end: the real llama.cpp server (xllamacpp) with SmolLM2-135M.

Nothing is mocked: the proxy starts the engine processes, the calls go through real
sockets, and the faults are real signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.engines.metrics_export import engine_metrics_text, engine_status, metrics_sources
from proxy.engines.supervisor import EngineSupervisor
from proxy.services import SERVICES
from tests.conftest import StartApp
from tests.support import ProxyProcess, free_port
from tests.support.engines import alive, children, cmdline, engine_yaml, gone, kill, until
from tests.support.metrics import scrape

pytestmark = pytest.mark.timeout(90)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@dataclass
class EngineProxy:
    url: str
    app: web.Application
    client: openai.AsyncOpenAI

    @property
    def supervisor(self) -> EngineSupervisor:
        return self.app[SERVICES].engines.supervisors["local"]


MakeEngineProxy = Callable[[str], Awaitable[EngineProxy]]


@pytest.fixture
async def make_engine_proxy(start_app: StartApp, tmp_path: Path) -> AsyncIterator[MakeEngineProxy]:
    clients: list[openai.AsyncOpenAI] = []

    async def make(text: str) -> EngineProxy:
        path = tmp_path / "routes.yaml"
        path.write_text(text)
        app = make_app(ConfigHolder(load_config(path), path))
        url = await start_app(app)
        clients.append(openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0))
        return EngineProxy(url, app, clients[-1])

    yield make
    for client in clients:
        await client.close()


async def _engine_metrics(proxy: EngineProxy) -> str:
    """The engines' own metrics as the proxy's scrape relabels them (one worker: "0")."""
    engines = proxy.app[SERVICES].engines
    sources = [("0", source) for source in metrics_sources(engines)]
    return await engine_metrics_text(engines.session, sources)


async def engine_counters(proxy: EngineProxy) -> dict[tuple[str, str], float]:
    """(sample name, replica) → value, from the relabelled engine metrics."""
    text = await _engine_metrics(proxy)
    return {
        (s.name, s.labels["replica"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("engine") == "local"
    }


async def test_chat_and_stream_through_the_proxy(make_engine_proxy: MakeEngineProxy):
    proxy = await make_engine_proxy(engine_yaml())
    models = await proxy.client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]

    before = await _wait_counters(proxy)
    reply = await proxy.client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24
    )
    after = await engine_counters(proxy)
    text = reply.choices[0].message.content
    assert text  # a 135M model: real words, not always the right ones
    assert reply.model == "smollm2"
    # The usage the client got is what the engine counted for this call.
    assert reply.usage is not None
    predicted = ("llamacpp:tokens_predicted_total", "0")
    assert reply.usage.completion_tokens == after[predicted] - before[predicted]
    assert reply.usage.prompt_tokens == _prompt_tokens(after) - _prompt_tokens(before)

    stream = await proxy.client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    final = await engine_counters(proxy)
    assert "".join(parts) == text  # temperature 0: the same answer, token by token
    assert usage is not None
    assert usage.completion_tokens == reply.usage.completion_tokens
    assert usage.completion_tokens == final[predicted] - after[predicted]
    assert usage.prompt_tokens == _prompt_tokens(final) - _prompt_tokens(after)

    # A stream whose client did not ask for usage: the proxy asks for it, strips it, bills it.
    quiet = await proxy.client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24, stream=True
    )
    assert all([chunk.usage is None async for chunk in quiet])
    last = await engine_counters(proxy)
    # The ledger holds exactly what the engine counted for the three calls.
    rows = await proxy.app[SERVICES].accountant.primary.ledger(["anonymous"], 0, 10**6)
    assert [(r.model, r.counts[0]) for r in rows] == [("smollm2", 3)]
    _, prompt, completion, est_prompt, est_completion, _ = rows[0].counts  # then the cost
    assert completion == last[predicted] - before[predicted]
    assert prompt == _prompt_tokens(last) - _prompt_tokens(before)
    assert est_prompt == est_completion == 0


async def _wait_counters(proxy: EngineProxy) -> dict[tuple[str, str], float]:
    """The engine starts at boot; wait until it is ready, without sending it a call."""
    await until(lambda: proxy.supervisor.replicas[0].state == "ready", 60, "engine ready")
    return await engine_counters(proxy)


def _prompt_tokens(counters: dict[tuple[str, str], float]) -> float:
    # llama.cpp counts prompt tokens it reused from its cache apart from those it ran.
    return (
        counters[("llamacpp:prompt_tokens_total", "0")]
        + counters[("llamacpp:prompt_tokens_cached_total", "0")]
    )


async def test_two_replicas_both_serve(make_engine_proxy: MakeEngineProxy):
    # Two cores: one thread per replica.
    proxy = await make_engine_proxy(engine_yaml(replicas=2, threads=1))
    replicas = proxy.supervisor.replicas
    # Calls that come before any replica is ready all go to the first one to get ready.
    await until(lambda: all(r.state == "ready" for r in replicas), 60, "both replicas ready")

    async def ask(i: int) -> str:
        reply = await proxy.client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Say the number {i}."}],
            temperature=0,
            max_tokens=8,
        )
        return reply.choices[0].message.content or ""

    answers = await asyncio.gather(*(ask(i) for i in range(4)))
    assert all(answers)
    counters = await engine_counters(proxy)
    served = {r: counters[("llamacpp:tokens_predicted_total", r)] for r in ("0", "1")}
    assert all(tokens > 0 for tokens in served.values()), served
    assert [r.stats.starts for r in proxy.supervisor.replicas] == [1, 1]
    # One family per metric in the merged scrape, one labelled sample per replica.
    text = await _engine_metrics(proxy)
    assert text.count("# TYPE llamacpp:tokens_predicted_total counter") == 1
    assert 'llamacpp:tokens_predicted_total{engine="local",replica="1",worker="0"}' in text


async def test_calls_beyond_llama_cpp_s_slot_queue_and_beyond_the_queue_get_a_429(
    make_engine_proxy: MakeEngineProxy,
):
    """The launcher's llama.cpp serves one call at a time (--parallel 1, so one slot):
    of three calls sent at once, one is served, one waits in the one-place queue and
    is served after it, and one is refused at once with a 429 and a Retry-After."""
    proxy = await make_engine_proxy(engine_yaml(engine="      queue: {max: 1, wait: 60s}"))
    await until(lambda: proxy.supervisor.replicas[0].state == "ready", 60, "engine ready")
    assert proxy.supervisor.spec.slots == 1
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}

    async def call(http: aiohttp.ClientSession) -> tuple[int, str, float]:
        began = time.monotonic()
        async with http.post(proxy.url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After", ""), time.monotonic() - began

    async with aiohttp.ClientSession() as http:
        results = sorted(await asyncio.gather(*(call(http) for _ in range(3))))
        counted = await scrape(http, proxy.url)
    [(ok1, _, took1), (ok2, _, took2), (refused, retry_after, _)] = results
    assert (ok1, ok2, refused) == (200, 200, 429)
    assert int(retry_after) >= 1
    # The second waited for the first: one call admitted at once, the other after a
    # wait that only the first call's service explains. (Not their times' ratio: with
    # the same prompt cached, the second call's service is a fraction of the first's.)
    waits = "llm_proxy_engine_queue_wait_seconds"
    assert counted.value(waits + "_count", engine="local") == 2
    assert counted.value(waits + "_bucket", engine="local", le="0.01") == 1
    assert counted.value(waits + "_sum", engine="local") > 0.5 * min(took1, took2)


async def test_killed_engine_is_restarted(
    make_engine_proxy: MakeEngineProxy, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="proxy.engines")
    proxy = await make_engine_proxy(
        engine_yaml(engine="      wait: 30s\n      restart: {base_delay: 6s, max_delay: 12s}")
    )
    await _wait_counters(proxy)
    replica = proxy.supervisor.replicas[0]
    first = replica.pid
    assert first is not None
    kill(first, signal.SIGKILL)
    await until(lambda: replica.state == "backoff", 5, "the crash noticed")

    # While it is down and no start is under way: a clear 503 in the OpenAI shape at
    # once, not after the 30 s wait (which is for a start in progress).
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client.chat.completions.create(model="smollm2", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert time.monotonic() - began < 10
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "engine_unavailable"
    assert "Local engine 'local' cannot serve now" in error["message"]
    assert "exited on signal SIGKILL" in error["message"]

    # A call that arrives while it starts again waits for it instead of failing.
    await until(lambda: replica.state == "starting", 15, "the restart")
    reply = await proxy.client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8
    )
    assert reply.choices[0].message.content
    assert replica.pid not in (None, first)
    assert (replica.stats.crashes, replica.stats.restarts, replica.stats.starts) == (1, 1, 2)
    status = engine_status(proxy.app[SERVICES].engines)[0]
    assert (status.state, status.crashes, status.restarts, status.in_flight) == ("ready", 1, 1, 0)
    assert "engine local#0 exited on signal SIGKILL; restarting in 6.0s" in caplog.text
    assert "[local#0]" in caplog.text  # the engine's own output, under its name


async def test_an_engine_that_cannot_start_gets_a_clear_503(make_engine_proxy: MakeEngineProxy):
    text = engine_yaml(engine="      wait: 500ms\n      restart: {base_delay: 100ms}")
    proxy = await make_engine_proxy(text.replace('"{python}"', '"/nonexistent/python"'))
    with pytest.raises(openai.APIStatusError) as caught:
        await proxy.client.chat.completions.create(model="smollm2", messages=MESSAGES)
    assert caught.value.status_code == 503
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "engine_unavailable"
    assert "cannot start '/nonexistent/python'" in body["message"]
    replica = proxy.supervisor.replicas[0]
    await until(lambda: replica.stats.crashes >= 2, 5, "a retry")  # retried, with backoff


async def test_first_request_start_and_idle_unload(make_engine_proxy: MakeEngineProxy):
    engine = "      start: first_request\n      idle_unload: 500ms\n      wait: 60s"
    proxy = await make_engine_proxy(engine_yaml(engine=engine))
    await asyncio.sleep(0.3)
    assert "local" not in proxy.app[SERVICES].engines.supervisors  # nothing started at boot

    # The first call starts the engine and waits until it is ready.
    reply = await proxy.client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8
    )
    assert reply.choices[0].message.content
    supervisor = proxy.supervisor

    # A call that takes several idle periods keeps the engine loaded to its last token.
    stream = await proxy.client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Count from 1 to 500."}],
        # Long enough to outlast an idle check on a fast machine too: 240 tokens took
        # 1.3 s in a fresh venv here, under the 1.5 s the check below needs.
        max_tokens=600,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    began, finish, usage = time.monotonic(), None, None
    async for chunk in stream:
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    # Idle checks run every second: a call this long spans one past its idle time.
    assert time.monotonic() - began > 1.5, "the call must outlast an idle check"
    # Every token was generated (some stream as empty deltas: partial UTF-8 sequences).
    assert finish == "length" and usage is not None and usage.completion_tokens == 600
    assert supervisor.unloads == 0

    pid = supervisor.replicas[0].pid
    assert pid is not None
    await until(lambda: supervisor.unloads == 1, 5, "the idle unload")
    await until(gone(pid), 10, "the unloaded engine's exit")
    await until(lambda: supervisor.replicas[0].state == "stopped", 5, "stopped")

    reply = await proxy.client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8
    )
    assert reply.choices[0].message.content
    assert supervisor.replicas[0].stats.starts == 2


async def test_reload_replaces_and_removes_engines(make_engine_proxy: MakeEngineProxy):
    proxy = await make_engine_proxy(engine_yaml())
    old = proxy.supervisor
    await until(lambda: old.replicas[0].state == "ready", 60, "engine ready")
    old_pid = old.replicas[0].pid
    assert old_pid is not None
    path = proxy.app[SERVICES].config.path
    assert path is not None

    # A changed engine (one thread now) replaces the old one; the old process goes.
    path.write_text(engine_yaml(threads=1))
    await until(lambda: proxy.supervisor is not old, 5, "the reload")
    await until(gone(old_pid), 20, "the old engine's exit")
    reply = await proxy.client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8
    )
    assert reply.choices[0].message.content
    assert "--threads 1" in cmdline(proxy.supervisor.replicas[0].pid or 0)

    # An engine removed from the file is stopped.
    new_pid = proxy.supervisor.replicas[0].pid
    assert new_pid is not None
    path.write_text(
        "providers:\n  other: {base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  m: {targets: [{provider: other, model: m}]}\n"
    )
    await until(gone(new_pid), 20, "the removed engine's exit")
    assert proxy.app[SERVICES].engines.supervisors == {}


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_no_engine_outlives_the_proxy(tmp_path: Path, signum: signal.Signals):
    path = tmp_path / "routes.yaml"
    path.write_text(engine_yaml(replicas=2, threads=1, provider="    required: true"))
    process = ProxyProcess(path, free_port())
    try:
        await process.wait_listening()
        async with aiohttp.ClientSession() as http:
            await until_ready(http, process.url)
        engines = children(process.process.pid)
        assert len(engines) == 2
        assert all("proxy.engines.llamacpp" in cmdline(pid) for pid in engines)
        process.signal(signum)
        await asyncio.to_thread(process.process.wait, 20)
        for pid in engines:
            await until(gone(pid), 5, f"engine {pid} gone after {signum.name} of the proxy")
    finally:
        process.stop()
    if signum == signal.SIGTERM:
        assert process.process.returncode == 0
        assert "engine local#1 stopped" in process.log()
    assert not any(alive(pid) for pid in engines)


async def test_no_engine_outlives_a_killed_proxy_with_workers(tmp_path: Path):
    path = tmp_path / "routes.yaml"
    path.write_text(engine_yaml(threads=1, provider="    required: true"))
    process = ProxyProcess(path, free_port(), "--workers", "2")
    workers: list[int] = []
    try:
        await process.wait_listening(workers=2)
        workers = children(process.process.pid)
        assert len(workers) == 2
        # Each worker runs its own engine; wait until both are up.
        await until(lambda: all(children(w) for w in workers), 30, "an engine per worker")
        engines = [e for w in workers for e in children(w)]
        assert all("proxy.engines.llamacpp" in cmdline(pid) for pid in engines)
        process.signal(signal.SIGKILL)
        await asyncio.to_thread(process.process.wait, 20)
        for pid in [*workers, *engines]:
            await until(gone(pid), 30, f"{cmdline(pid)!r} gone after SIGKILL of the proxy")
    finally:
        process.stop()
        for pid in workers:  # if the test failed: no orphans left behind by it either
            if alive(pid):
                kill(pid, signal.SIGTERM)


async def until_ready(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        async with http.get(url + "/readyz") as response:
            if response.status == 200:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError("the proxy's engines did not get ready")
