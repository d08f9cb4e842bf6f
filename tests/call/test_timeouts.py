"""The provider's ``connect`` and ``total`` timeouts, and a client's ``X-Request-Timeout``,
end to end: an in-process proxy against real sockets that misbehave in time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeProxy, Proxy, StartApp
from tests.support import Upstream, routes_yaml
from tests.support.fake_upstream import Fault

CHAT = "/v1/chat/completions"
PLAIN = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# Far above every timeout under test: a call still running then has ignored its timeout.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
async def first_url(request: pytest.FixtureRequest, start_app: StartApp) -> AsyncIterator[str]:
    """The base URL of the misbehaving upstream named by the test's parameter."""
    if request.param == "unanswering":
        async with _unanswering() as url:
            yield url
    else:
        yield await start_app(_trickling()) + "/v1"


@contextlib.asynccontextmanager
async def _unanswering() -> AsyncIterator[str]:
    """A base URL whose TCP handshake never completes: a listening socket whose accept
    queue (backlog 0: one connection) is full, so the kernel drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    host, port = listener.getsockname()
    with listener, socket.create_connection((host, port)):
        with pytest.raises(TimeoutError):  # the trick holds on this kernel
            async with asyncio.timeout(0.2):
                await asyncio.open_connection(host, port)
        yield f"http://{host}:{port}/v1"


def _trickling() -> web.Application:
    """An upstream whose answers are JSON that never ends: a space every 50 ms, each gap
    far below any ``idle`` timeout."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:
            await response.write(b" ")
            await asyncio.sleep(0.05)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    return app


def _first_then_wandb(wandb: Upstream, prime: Upstream, first_url: str, timeouts: str) -> str:
    """routes.yaml with model ``m``: provider ``first`` (at ``first_url``), then wandb."""
    return routes_yaml(
        wandb,
        prime,
        extra=(
            "  m:\n    targets:\n      - {provider: first, model: m}\n"
            "      - {provider: wandb, model: m}\n"
        ),
    ).replace(
        "models:\n",
        f"  first:\n    base_url: {first_url}\n    timeouts: {timeouts}\nmodels:\n",
        1,
    )


async def _call(proxy: Proxy, payload: dict[str, Any], **kwargs: Any) -> tuple[int, Any]:
    async with proxy.http.post(
        proxy.url + CHAT, json=payload, timeout=CLIENT_TIMEOUT, **kwargs
    ) as resp:
        return resp.status, await resp.json()


def _attempts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    line = json.loads([r for r in caplog.records if r.name == "proxy.access"][-1].getMessage())
    return [(a["provider"], a["outcome"], a["detail"]) for a in line["attempts"]]


# Each first upstream misbehaves so that only one timeout can end its attempt in time:
# a handshake that never completes (connect; first_byte and total far away), or an
# answer whose bytes keep coming well within idle and first_byte (total).
@pytest.mark.parametrize(
    ("first_url", "timeouts", "detail"),
    [
        (
            "unanswering",
            "{connect: 300ms, first_byte: 60s, idle: 60s, total: 60s}",
            "upstream_timeout",  # a timeout, as docs/api.md's 504 row says, not a refusal
        ),
        ("trickling", "{connect: 2s, first_byte: 5s, idle: 5s, total: 500ms}", "upstream_timeout"),
    ],
    ids=["connect", "total"],
    indirect=["first_url"],
)
async def test_a_timeout_ends_the_attempt_and_the_call_falls_back(
    make_proxy: MakeProxy,
    wandb: Upstream,
    prime: Upstream,
    caplog: pytest.LogCaptureFixture,
    first_url: str,
    timeouts: str,
    detail: str,
):
    proxy = await make_proxy(_first_then_wandb(wandb, prime, first_url, timeouts))
    caplog.set_level(logging.INFO, logger="proxy.access")
    status, body = await _call(proxy, PLAIN)
    assert (status, body["model"]) == (200, "m")
    assert _attempts(caplog) == [("first", "failed", detail), ("wandb", "ok", "200")]


async def test_total_timeout_ends_a_stream_that_never_ends(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    text = routes_yaml(wandb, prime).replace(
        "{connect: 2s, first_byte: 3s, idle: 2s, total: 20s}",
        "{connect: 2s, first_byte: 3s, idle: 2s, total: 1s}",
        1,  # wandb's
    )
    proxy = await make_proxy(text)
    event = b'data: {"choices":[{"index":0,"delta":{"content":"A"}}]}\n\n'
    # 200 events 50 ms apart: 10 s of a stream that is never idle.
    script: list[bytes | float | asyncio.Event] = [event, 0.05] * 200
    wandb.fake.stream_script = [*script, b"data: [DONE]\n\n"]
    payload = {"model": "llama-8b", "messages": PLAIN["messages"], "stream": True}
    async with proxy.http.post(proxy.url + CHAT, json=payload, timeout=CLIENT_TIMEOUT) as resp:
        assert resp.status == 200
        body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e]
    assert 1 <= events.count(event[:-2]) < 200 and b"[DONE]" not in body
    last = json.loads(events[-1][len(b"data: ") :])
    assert last["error"]["code"] == "upstream_timeout"


async def test_x_request_timeout_narrows_the_budget_for_a_backoff(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    # A retry of prime would wait a full-jitter draw below an hour (under 0.5 s with
    # probability 1/7200), well within the model's two-hour budget: only the client's
    # half second makes the call fall back to wandb at once instead.
    retry = "{attempts: 2, base_delay: 1h, max_delay: 1h, budget: 2h}"
    proxy = await make_proxy(routes_yaml(wandb, prime, retry=retry))
    caplog.set_level(logging.INFO, logger="proxy.access")
    prime.fake.faults = [Fault(status=503)]
    status, body = await _call(
        proxy, {**PLAIN, "model": "llama-70b"}, headers={"X-Request-Timeout": "0.5"}
    )
    assert (status, body["model"]) == (200, "meta-llama/Llama-3.1-70B-Instruct")
    assert _attempts(caplog) == [("prime", "failed", "503"), ("wandb", "ok", "200")]
