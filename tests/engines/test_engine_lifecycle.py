"""The engine supervisor against a fake engine (tests/support/fake_engine.py), a real process
that starts in a blink: stopping, restarting with backoff, the engines' metrics on the
proxy's ``GET /metrics``; and the shipped launcher's OpenMP default."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.engines.replica import Replica
from proxy.services import SERVICES
from tests.conftest import StartApp
from tests.support import ROOT, eventually
from tests.support.engines import alive
from tests.support.metrics import scrape

pytestmark = pytest.mark.timeout(60)

FAKE_ENGINE = ROOT / "tests" / "support" / "fake_engine.py"


def fake_engine_yaml(args: str = "", engine: str = "") -> str:
    """routes.yaml with one engine provider ``local``: the fake engine, with ``args``."""
    return f"""
providers:
  local:
    engine:
      command: ["{{python}}", "{FAKE_ENGINE}", "--port", "{{port}}"{args}]
      ready: {{timeout: 10s, interval: 50ms}}
{engine}
models:
  m: {{targets: [{{provider: local, model: m}}]}}
"""


MakeApp = Callable[[str], Awaitable[tuple[web.Application, str]]]


@pytest.fixture
async def make_engine_app(start_app: StartApp, tmp_path: Path) -> AsyncIterator[MakeApp]:
    async def make(text: str) -> tuple[web.Application, str]:
        path = tmp_path / "routes.yaml"
        path.write_text(text)
        app = make_app(ConfigHolder(load_config(path), path))
        return app, await start_app(app)

    yield make


def replica(app: web.Application) -> Replica:
    return app[SERVICES].engines.supervisors["local"].replicas[0]


async def test_an_engine_that_ignores_sigterm_is_killed_after_stop_timeout(
    make_engine_app: MakeApp, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="proxy.engines")  # the engine's own lines too
    app, _ = await make_engine_app(
        fake_engine_yaml(', "--ignore-sigterm"', "      stop_timeout: 300ms")
    )
    await eventually(lambda: "local" in app[SERVICES].engines.supervisors, timeout=10)
    await eventually(lambda: replica(app).state == "ready", timeout=10)
    pid = replica(app).pid
    assert pid is not None
    try:
        async with asyncio.timeout(10):  # far above stop_timeout: a stop that never ends fails
            await app[SERVICES].engines.supervisors["local"].stop()
    finally:
        if alive(pid):  # so that a failure here does not hang the app's cleanup too
            os.kill(pid, signal.SIGKILL)
    assert not alive(pid)
    text = caplog.text
    # SIGTERM first (the engine saw it and stayed), then the kill.
    assert "fake engine: SIGTERM ignored" in text
    warning = "engine local#0 did not stop in 0s after SIGTERM: killing it"
    assert text.index("fake engine: SIGTERM ignored") < text.index(warning)


async def test_restart_delays_double_and_start_afresh_after_max_delay_of_uptime(
    make_engine_app: MakeApp, caplog: pytest.LogCaptureFixture, tmp_path: Path
):
    # Three runs that exit at once, one that serves for longer than max_delay, one more
    # that exits at once; then it serves.
    lives = tmp_path / "lives"
    lives.write_text("0\n0\n0\n1.2\n0\n")
    caplog.set_level(logging.INFO, logger="proxy.engines")
    app, _ = await make_engine_app(
        fake_engine_yaml(
            f', "--lives", "{lives}"', "      restart: {base_delay: 200ms, max_delay: 800ms}"
        )
    )

    def delays() -> list[str]:
        return re.findall(r"engine local#0 .*; restarting in ([\d.]+)s", caplog.text)

    await eventually(lambda: len(delays()) == 5, timeout=20)
    assert delays() == ["0.2", "0.4", "0.8", "0.2", "0.4"]
    await eventually(lambda: replica(app).state == "ready", timeout=10)
    await app[SERVICES].engines.supervisors["local"].stop()


async def test_the_engines_metrics_are_appended_to_get_metrics(make_engine_app: MakeApp):
    app, url = await make_engine_app(fake_engine_yaml(engine="      metrics_path: /metrics"))
    await eventually(lambda: "local" in app[SERVICES].engines.supervisors, timeout=10)
    await eventually(lambda: replica(app).state == "ready", timeout=10)
    async with aiohttp.ClientSession() as http:
        counted = await scrape(http, url)
    assert counted.value("fake_engine_calls_total", engine="local", replica="0") == 42
    assert "llm_proxy_requests_total" in counted.text  # the proxy's own, the same scrape
    await app[SERVICES].engines.supervisors["local"].stop()


def _command_yaml(command: str, engine: str, provider: str = "") -> str:
    """routes.yaml with one engine provider ``local`` running ``command`` (a JSON list)."""
    return f"""
providers:
  local:
{provider}    engine:
      command: {command}
{engine}
models:
  m: {{targets: [{{provider: local, model: m}}]}}
"""


async def _failed_call(url: str) -> tuple[dict[str, str], float]:
    """A call that gets a 503: its error, and how long it took."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        began = loop.time()
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 503
            error: dict[str, str] = (await resp.json())["error"]
    assert error["code"] == "engine_unavailable"
    return error, loop.time() - began


async def test_a_crash_looping_engine_fails_readyz_and_its_calls_at_once(
    make_engine_app: MakeApp,
):
    """An engine whose every start fails (the image without the model, say): while it
    waits out its backoff, a call gets 503 engine_unavailable with the last error at
    once rather than after ``wait`` (30 s here), and /readyz fails, since it is
    required, naming that error."""
    command = """["{python}", "-c", "import sys; print('no model here'); sys.exit(3)"]"""
    engine = "      ready: {timeout: 10s, interval: 50ms}\n      wait: 30s\n"
    engine += "      restart: {base_delay: 5s, max_delay: 5s}"
    app, url = await make_engine_app(_command_yaml(command, engine, "    required: true\n"))
    await eventually(lambda: "local" in app[SERVICES].engines.supervisors, timeout=10)
    await eventually(lambda: replica(app).state == "backoff", timeout=10)
    error, took = await _failed_call(url)
    assert took < 10  # not the 30 s wait
    assert "cannot serve now" in error["message"]
    assert "#0 backoff (last: failed to start: " in error["message"]
    assert "exited with code 3" in error["message"]
    async with aiohttp.ClientSession() as http, http.get(url + "/readyz") as ready:
        assert ready.status == 503
        readiness = await ready.text()
    assert "engine 'local': no replica is ready (#0 backoff (last: failed to start" in readiness
    await app[SERVICES].engines.supervisors["local"].stop()


async def test_a_call_waits_for_a_start_in_progress_then_gets_a_503(make_engine_app: MakeApp):
    """An engine still starting (it never answers its ready check here): a call waits
    ``wait`` for it, then gets 503 engine_unavailable saying the replica is starting."""
    command = """["{python}", "-c", "import time; time.sleep(60)"]"""
    engine = "      ready: {timeout: 50s, interval: 50ms}\n      wait: 1s"
    app, url = await make_engine_app(_command_yaml(command, engine))
    await eventually(lambda: "local" in app[SERVICES].engines.supervisors, timeout=10)
    await eventually(lambda: replica(app).state == "starting", timeout=10)
    error, took = await _failed_call(url)
    assert took >= 1.0  # it waited for the start
    assert "is not ready after waiting 1s (replicas: #0 starting)" in error["message"]
    await app[SERVICES].engines.supervisors["local"].stop()


async def test_an_engine_s_chatter_is_debug_and_its_warnings_and_errors_are_not(
    make_engine_app: MakeApp, caplog: pytest.LogCaptureFixture
):
    """llama.cpp's lines carry a level letter (I, W, E); other engines print level
    words. At the default INFO only the warnings, the errors and the launcher's own
    lines show; at DEBUG the chatter shows too."""
    caplog.set_level(logging.DEBUG, logger="proxy.engines")
    printed = [
        "0.00.006.267 I srv  load_model: loading model",
        "0.00.006.300 W srv  the context is small",
        "0.00.006.400 E srv  cannot allocate",
        "llamacpp: serving model.gguf on 127.0.0.1:1",
        "INFO:     Started server process",
        "WARNING: this is a warning",
        "Traceback (most recent call last):",
    ]
    script = "import sys, time; print(*sys.argv[1:], sep='\\n', flush=True); time.sleep(60)"
    command = json.dumps(["{python}", "-c", script, *printed])
    app, _ = await make_engine_app(_command_yaml(command, "      ready: {timeout: 50s}"))

    def levels() -> dict[str, str]:
        output = [r for r in caplog.records if r.name == "proxy.engines.output"]
        return {r.getMessage().removeprefix("[local#0] "): r.levelname for r in output}

    await eventually(lambda: len(levels()) == len(printed), timeout=10)
    assert [levels()[line] for line in printed] == [
        *("DEBUG", "WARNING", "ERROR", "INFO", "DEBUG", "WARNING", "ERROR")
    ]
    await app[SERVICES].engines.supervisors["local"].stop()


async def test_an_engine_s_calls_cost_its_price_per_million_tokens(make_engine_app: MakeApp):
    """0.5 USD per million prompt tokens and 2 per million completion tokens: the fake
    engine's 100 and 10 tokens cost 50 + 20 micro-dollars a call."""
    priced = fake_engine_yaml(engine="    price: {input: 0.5, output: 2}")
    app, url = await make_engine_app(priced + "admin_key: admin\n")
    await eventually(lambda: "local" in app[SERVICES].engines.supervisors, timeout=10)
    call = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(url + "/v1/chat/completions", json=call) as resp:
                assert resp.status == 200, await resp.text()
        admin = {"Authorization": "Bearer admin"}
        async with http.get(url + "/v1/usage", headers=admin) as resp:
            [row] = (await resp.json())["data"]
    assert (row["prompt_tokens"], row["cost_micro_usd"]) == (200, 140)
    await app[SERVICES].engines.supervisors["local"].stop()


# The launcher runs under the proxy as the shipped routes.yaml runs it, with a stand-in
# xllamacpp that records the environment it is imported in (libgomp reads it when it
# loads), then refuses to load, so the launcher stops there.
@pytest.mark.parametrize(
    ("env", "seen"), [("", "1000"), (", GOMP_SPINCOUNT: '7'", "7")], ids=["default", "env"]
)
async def test_the_launcher_sets_gomp_spincount_before_loading_llama_cpp(
    make_engine_app: MakeApp,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    seen: str,
):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    stub = tmp_path / "stub" / "xllamacpp"
    stub.mkdir(parents=True)
    record = tmp_path / "environ.json"
    stub.joinpath("__init__.py").write_text(
        "import json, os\n"
        f"open({str(record)!r} + '.new', 'w').write(json.dumps(dict(os.environ)))\n"
        f"os.replace({str(record)!r} + '.new', {str(record)!r})\n"
        "raise ImportError('stand-in')\n"
    )
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    app, _ = await make_engine_app(f"""
providers:
  local:
    engine:
      command: ["{{python}}", "-m", "proxy.engines.llamacpp", "--model", "{model}",
                "--port", "{{port}}"]
      env: {{PYTHONPATH: "{tmp_path / "stub"}{os.pathsep}{ROOT}"{env}}}
models:
  m: {{targets: [{{provider: local, model: m}}]}}
""")
    await eventually(record.exists, timeout=20)
    assert json.loads(record.read_text())["GOMP_SPINCOUNT"] == seen
    await app[SERVICES].engines.supervisors["local"].stop()
