"""A local engine's fair queue end to end (engines/fair_queue.py): a proxy in this process,
the fake engine (tests/support/fake_engine.py) as a real process holding each call for
``--delay`` seconds and writing down the order calls reach it, teams with real keys.

What a user notices: whose call the engine serves next, a 429 with a Retry-After when
the queue is full or the wait runs out, a call whose client left never reaching the
engine, a reload's new queue settings reaching the calls already waiting, and a call
sent to the hosted fallback when the engine's queue is too long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import make_app
from proxy.call.auth import key_hash
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.engines.supervisor import EngineSupervisor
from proxy.services import SERVICES
from tests.conftest import StartApp
from tests.support import ROOT, Upstream, eventually
from tests.support.metrics import scrape

pytestmark = pytest.mark.timeout(60)

FAKE_ENGINE = ROOT / "tests" / "support" / "fake_engine.py"
KEYS = {"x": "sk-team-x-0123456789", "y": "sk-team-y-0123456789"}


def queue_yaml(
    log: Path,
    delay: float,
    engine: str = "",
    weights: tuple[float, float] = (1, 1),
    extra: str = "",
    args: str = "",
) -> str:
    """One engine ``local`` (the fake, ``delay`` s a call) serving model ``m``; teams x, y."""
    return f"""
server: {{reload_interval: 100ms}}
teams:
  x: {{keys: ["{key_hash(KEYS["x"])}"], weight: {weights[0]}}}
  y: {{keys: ["{key_hash(KEYS["y"])}"], weight: {weights[1]}}}
providers:
  local:
    engine:
      command: ["{{python}}", "{FAKE_ENGINE}", "--port", "{{port}}", "--delay", "{delay}",
                "--log", "{log}"{args}]
      ready: {{timeout: 10s, interval: 50ms}}
{engine}
{extra}
"""


@dataclass
class QueueProxy:
    url: str
    app: web.Application
    path: Path
    log: Path
    http: aiohttp.ClientSession

    @property
    def supervisor(self) -> EngineSupervisor:
        return self.app[SERVICES].engines.supervisors["local"]

    def seen(self) -> list[str]:
        """What the engine received, in order."""
        return self.log.read_text().split() if self.log.exists() else []

    async def chat(
        self,
        team: str,
        content: str,
        model: str = "m",
        system: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, float]:
        """Status, body and the Retry-After header (0 without one) of one call; its
        message ``content``, after a ``system`` prompt if given."""
        messages = [{"role": "user", "content": content}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        body = {"model": model, "messages": messages}
        headers = {"Authorization": f"Bearer {KEYS[team]}", **(headers or {})}
        async with self.http.post(
            self.url + "/v1/chat/completions", json=body, headers=headers
        ) as resp:
            return resp.status, await resp.json(), float(resp.headers.get("Retry-After", 0))

    def send(
        self, team: str, content: str, system: str | None = None
    ) -> asyncio.Task[tuple[int, Any, float]]:
        return asyncio.create_task(self.chat(team, content, system=system))

    async def queued(self, depth: int) -> None:
        await eventually(lambda: self.supervisor.queue.depth == depth, timeout=10)

    async def serving(self, content: str) -> None:
        await eventually(lambda: content in self.seen(), timeout=10)


MakeQueueProxy = Callable[..., Awaitable[QueueProxy]]
MODEL = "models:\n  m: {targets: [{provider: local, model: m}]}\n"


@pytest.fixture
async def make_queue_proxy(start_app: StartApp, tmp_path: Path) -> AsyncIterator[MakeQueueProxy]:
    sessions: list[aiohttp.ClientSession] = []
    apps: list[web.Application] = []

    async def make(delay: float, engine: str = "", **kwargs: Any) -> QueueProxy:
        log, path = tmp_path / "engine.log", tmp_path / "routes.yaml"
        kwargs.setdefault("extra", MODEL)
        path.write_text(queue_yaml(log, delay, engine, **kwargs))
        app = make_app(ConfigHolder(load_config(path), path))
        url = await start_app(app)
        sessions.append(aiohttp.ClientSession())
        apps.append(app)
        proxy = QueueProxy(url, app, path, log, sessions[-1])
        await eventually(lambda: "local" in app[SERVICES].engines.supervisors, timeout=10)
        await eventually(lambda: proxy.supervisor.replicas[0].state == "ready", timeout=10)
        return proxy

    yield make
    for session in sessions:
        await session.close()
    for app in apps:
        await app[SERVICES].engines.close()


async def test_a_burst_does_not_starve_another_team_and_weights_share_the_slot(
    make_queue_proxy: MakeQueueProxy,
):
    """One slot, held 0.2 s a call. Team x's call holds it while x queues four more,
    then team y (weight 3) queues four: y's first call goes right after x's first
    waiting one, then y gets three turns to x's one, so the engine sees
    x1 y1 y2 y3 x2 y4 x3 x4 rather than every x before any y."""
    proxy = await make_queue_proxy(0.2, "      slots: 1", weights=(1, 3))
    calls = [proxy.send("x", "x0")]
    await proxy.serving("x0")
    for i, (team, content) in enumerate([("x", f"x{n}") for n in range(1, 5)] + [
        ("y", f"y{n}") for n in range(1, 5)
    ]):  # fmt: skip
        calls.append(proxy.send(team, content))
        await proxy.queued(i + 1)  # each is queued before the next comes
    results = await asyncio.gather(*calls)
    assert [status for status, _, _ in results] == [200] * 9
    assert proxy.seen() == ["x0", "x1", "y1", "y2", "y3", "x2", "y4", "x3", "x4"]


async def test_a_full_queue_and_a_wait_past_the_limit_get_a_429_with_retry_after(
    make_queue_proxy: MakeQueueProxy,
):
    """One slot, one queue place, half a second of waiting, calls held 1 s. With one
    call served and one waiting, the next is refused at once; the one waiting is
    refused after its half second. Retry-After comes from the measured drain: a call
    holds the slot about 1 s, so the two ahead take about 2 s."""
    engine = "      slots: 1\n      queue: {max: 1, wait: 500ms}"
    proxy = await make_queue_proxy(1.0, engine)
    assert (await proxy.chat("x", "warm"))[0] == 200  # one hold measured
    serving = proxy.send("x", "a")
    await proxy.serving("a")
    waiting = proxy.send("y", "b")
    await proxy.queued(1)
    began = time.monotonic()
    status, body, retry_after = await proxy.chat("x", "c")
    assert status == 429
    assert time.monotonic() - began < 0.4  # at once, not after a wait
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] == "engine_queue"
    assert "its 1 queue places are taken" in body["error"]["message"]
    assert 2 <= retry_after <= 3
    status, body, retry_after = await waiting
    assert status == 429
    assert "no slot came free within 0.5s" in body["error"]["message"]
    assert retry_after >= 1
    assert (await serving)[0] == 200
    assert proxy.seen() == ["warm", "a"]  # b and c never reached the engine
    counted = await scrape(proxy.http, proxy.url)
    refused = "llm_proxy_engine_queue_rejections_total"
    assert counted.value(refused, engine="local", team="x", reason="full") == 1
    assert counted.value(refused, engine="local", team="y", reason="timeout") == 1
    waits = "llm_proxy_engine_queue_wait_seconds_count"
    assert counted.value(waits, engine="local", team="x") == 2  # warm and a, admitted


async def test_a_call_waits_for_a_slot_no_longer_than_its_own_time_budget(
    make_queue_proxy: MakeQueueProxy,
):
    """The queue lets a call wait 30 s, but the client said X-Request-Timeout: 0.5: the
    call is refused when its own budget runs out, saying so, not 30 s later, and never
    reaches the engine."""
    proxy = await make_queue_proxy(3.0, "      slots: 1\n      queue: {max: 8, wait: 30s}")
    serving = proxy.send("x", "a")
    await proxy.serving("a")
    began = time.monotonic()
    status, answer, _ = await proxy.chat("y", "b", headers={"X-Request-Timeout": "0.5"})
    assert status == 429
    assert time.monotonic() - began < 2.5  # its budget, not the queue's 30 s nor a slot
    assert answer["error"]["param"] == "engine_queue"
    assert "before the call's time budget ran out" in answer["error"]["message"]
    assert (await serving)[0] == 200
    assert proxy.seen() == ["a"]


async def test_a_full_queue_refuses_the_team_that_holds_it_not_the_newcomer(
    make_queue_proxy: MakeQueueProxy,
):
    """Three queue places, all x's. y's call takes the place of x's newest, which gets
    the 429; a second y call, with y and x now holding as many, is refused itself."""
    proxy = await make_queue_proxy(0.5, "      slots: 1\n      queue: {max: 3}")
    calls = {"x0": proxy.send("x", "x0")}
    await proxy.serving("x0")
    for depth, name in enumerate(["x1", "x2", "x3", "y1"], start=1):
        calls[name] = proxy.send(name[0], name)
        await proxy.queued(min(depth, 3))
    status, body, _ = await calls["x3"]
    assert status == 429
    assert "its place went to another team's call" in body["error"]["message"]
    status, body, _ = await proxy.chat("y", "y2")
    assert status == 429
    assert "its 3 queue places are taken" in body["error"]["message"]
    assert [(await calls[n])[0] for n in ("x0", "x1", "x2", "y1")] == [200] * 4
    assert proxy.seen() == ["x0", "x1", "y1", "x2"]


async def test_a_client_that_leaves_while_queued_never_takes_the_slot(
    make_queue_proxy: MakeQueueProxy,
):
    """A queued call whose client disconnects leaves the queue: the engine never sees
    it, and the call queued behind it gets the slot next."""
    proxy = await make_queue_proxy(0.6, "      slots: 1")
    serving = proxy.send("x", "a")
    await proxy.serving("a")
    leaving = proxy.send("x", "gone")
    await proxy.queued(1)
    behind = proxy.send("y", "b")
    await proxy.queued(2)
    leaving.cancel()  # the client closes its connection
    await proxy.queued(1)
    assert proxy.supervisor.queue.depth_of("x") == 0
    assert [(await serving)[0], (await behind)[0]] == [200, 200]
    assert proxy.seen() == ["a", "b"]
    counted = await scrape(proxy.http, proxy.url)
    assert (
        counted.value("llm_proxy_engine_queue_rejections_total", engine="local", reason="cancelled")
        == 1
    )
    assert counted.value("llm_proxy_engine_queue_depth", engine="local") == 0


async def test_a_reload_changes_the_queue_of_calls_already_waiting_without_a_restart(
    make_queue_proxy: MakeQueueProxy,
):
    """Two calls wait behind one slot (calls held 4 s, a 30 s queue wait). The file
    changes to two slots and a 300 ms wait: the first waiter is admitted at once, the
    second has waited longer than 300 ms and gets its 429, both long before the call
    being served ends, and the engine process is the same one."""
    proxy = await make_queue_proxy(4.0, "      slots: 1\n      queue: {wait: 30s}")
    pid = proxy.supervisor.replicas[0].pid
    supervisor = proxy.supervisor
    serving = proxy.send("x", "a")
    await proxy.serving("a")
    first, second = proxy.send("x", "b"), None
    await proxy.queued(1)
    second = proxy.send("y", "c")
    await proxy.queued(2)
    await asyncio.sleep(0.4)
    proxy.path.write_text(
        queue_yaml(proxy.log, 4.0, "      slots: 2\n      queue: {wait: 300ms}", extra=MODEL)
    )
    await proxy.serving("b")  # admitted to the new slot while "a" is still served
    status, body, _ = await second
    assert status == 429
    assert "within 0.3s" in body["error"]["message"]
    assert not serving.done()
    assert proxy.supervisor is supervisor
    assert proxy.supervisor.replicas[0].pid == pid
    assert [(await serving)[0], (await first)[0]] == [200, 200]


SPILL = """
  hosted:
    base_url: {url}
    api_key: ${{TEST_WANDB_KEY}}
models:
  m:
    spill_after: 1s
    targets:
      - {{provider: local, model: m, price: {{input: 0, output: 0}}}}
      - {{provider: hosted, model: big, price: {{input: 1, output: 4}}}}
"""


async def test_a_long_queue_spills_to_the_hosted_target_and_says_so_in_the_attempts(
    make_queue_proxy: MakeQueueProxy, wandb: Upstream, caplog: pytest.LogCaptureFixture
):
    """spill_after 1 s, one slot held 2 s a call. With the slot free the engine serves
    (free); once a call was measured holding it for 2 s, a call that would wait about
    that long goes to the hosted target instead of queueing, its access log line
    names the spill, and it costs the hosted target's price."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await make_queue_proxy(2.0, "      slots: 1", extra=SPILL.format(url=wandb.url))
    assert (await proxy.chat("x", "warm"))[0] == 200
    serving = proxy.send("x", "a")
    await proxy.serving("a")
    status, _, _ = await proxy.chat("y", "b")
    assert status == 200
    assert len(wandb.fake.seen) == 1 and wandb.fake.seen[0].json()["model"] == "big"
    assert (await serving)[0] == 200
    assert proxy.seen() == ["warm", "a"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]
    spilled = next(line for line in lines if line["team"] == "y")
    attempts = [(a["provider"], a["outcome"], a["detail"]) for a in spilled["attempts"]]
    assert attempts[0][:2] == ("local", "spilled")
    assert attempts[0][2].startswith("estimated queue wait 2.")
    assert attempts[0][2].endswith("> spill_after 1s")
    assert attempts[1:] == [("hosted", "ok", "200")]
    counted = await scrape(proxy.http, proxy.url)
    cost = "llm_proxy_cost_usd_total"
    assert counted.value(cost, team="y", provider="hosted") > 0  # the hosted price
    assert counted.value(cost, team="y", provider="local") == 0


async def test_the_spill_estimate_is_the_team_s_place_in_the_fair_order(
    make_queue_proxy: MakeQueueProxy, wandb: Upstream
):
    """One slot held 1 s a call, spill_after 3.5 s. Team x's "a" is served and x queues
    b, c, d (estimates 1, 2, 3 s: they stay); x's next would wait about 4 s and goes
    to the hosted target, while y's next call would go right after b, about 2 s, and
    stays on the engine."""
    spill = SPILL.format(url=wandb.url).replace("spill_after: 1s", "spill_after: 3500ms")
    proxy = await make_queue_proxy(1.0, "      slots: 1", extra=spill)
    assert (await proxy.chat("x", "warm"))[0] == 200
    calls = [proxy.send("x", "a")]
    await proxy.serving("a")
    for depth, name in enumerate(["b", "c", "d"], start=1):
        calls.append(proxy.send("x", name))
        await proxy.queued(depth)
    assert (await proxy.chat("x", "e"))[0] == 200
    assert [seen.json()["messages"][-1]["content"] for seen in wandb.fake.seen] == ["e"]
    calls.append(proxy.send("y", "f"))
    assert [status for status, _, _ in await asyncio.gather(*calls)] == [200] * 5
    assert proxy.seen() == ["warm", "a", "b", "f", "c", "d"]


async def test_calls_queued_when_the_engine_dies_get_a_503_not_a_wait(
    make_queue_proxy: MakeQueueProxy, tmp_path: Path
):
    """The engine exits 3 s after its start (its restart is 30 s away) while "a" is
    served and "b" waits: "b" gets 503 engine_unavailable as soon as "a" fails, not
    after the queue's 30 s wait, and a call that comes then gets it at once."""
    lives = tmp_path / "lives"
    lives.write_text("3\n")
    engine = "      slots: 1\n      restart: {base_delay: 30s, max_delay: 30s}"
    proxy = await make_queue_proxy(10.0, engine, args=f', "--lives", "{lives}"')
    began = time.monotonic()
    serving = proxy.send("x", "a")
    await proxy.serving("a")
    waiting = proxy.send("y", "b")
    await proxy.queued(1)
    status, body, _ = await waiting
    assert (status, body["error"]["code"]) == (503, "engine_unavailable")
    assert "cannot serve now" in body["error"]["message"]
    assert time.monotonic() - began < 8  # the engine's 3 s, not the queue's 30 s
    assert (await serving)[0] >= 500
    status, body, _ = await proxy.chat("x", "c")
    assert (status, body["error"]["code"]) == (503, "engine_unavailable")
    assert proxy.seen() == ["a"]
