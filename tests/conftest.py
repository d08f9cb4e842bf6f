from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import make_app
from proxy.config.load import load_config
from proxy.config.reload import ConfigHolder
from proxy.server import FAST_PATH_ENV, Serving
from tests.support import Upstream, routes_yaml, serve_app
from tests.support.fake_upstream import FakeUpstream

pytest_plugins = ["tests.support.teams"]

WANDB_KEY = "wandb-secret-key"
PRIME_KEY = "prime-secret-key"

StartApp = Callable[[web.Application], Awaitable[str]]


# The proxy's two servers (docs/ARCHITECTURE.md, "Two servers, one call path"): every
# test that starts a proxy, in this process or as a child, runs with the fast path on
# ("front") and off ("aiohttp"), unless it is marked front_only.
_PROXY_FIXTURES = {"make_proxy", "proxy", "proxy_process"}
_PROXY_NAMES = {"ProxyProcess", "make_app", "start_server", "serve_app"}
PATHS = ["front", "aiohttp"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    starts_a_proxy = _PROXY_FIXTURES & set(metafunc.fixturenames) or _PROXY_NAMES & set(
        vars(metafunc.module)
    )
    if not starts_a_proxy or "fast_path" in metafunc.fixturenames:
        return
    paths = ["front"] if metafunc.definition.get_closest_marker("front_only") else PATHS
    metafunc.fixturenames.append("fast_path")
    metafunc.parametrize("fast_path", paths, indirect=True)


@pytest.fixture
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The server a test's proxies use: PROXY_FAST_PATH, read by every proxy it starts."""
    path: str = request.param
    monkeypatch.setenv(FAST_PATH_ENV, "1" if path == "front" else "0")
    return path


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WANDB_KEY", WANDB_KEY)
    monkeypatch.setenv("TEST_PRIME_KEY", PRIME_KEY)


@pytest.fixture
async def start_app() -> AsyncIterator[StartApp]:
    runners: list[web.AppRunner | Serving] = []

    async def start(app: web.Application) -> str:
        runner, url = await serve_app(app)
        runners.append(runner)
        return url

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def wandb(start_app: StartApp) -> Upstream:
    fake = FakeUpstream(prefix="/v1", key=WANDB_KEY, name="wandb")
    return Upstream(fake, await start_app(fake.app()) + "/v1")


@pytest.fixture
async def prime(start_app: StartApp) -> Upstream:
    fake = FakeUpstream(prefix="/api/v1", key=PRIME_KEY, name="prime")
    return Upstream(fake, await start_app(fake.app()) + "/api/v1")


@dataclass
class Proxy:
    url: str
    holder: ConfigHolder
    path: Path
    http: aiohttp.ClientSession
    app: web.Application

    def write_config(self, text: str) -> None:
        self.path.write_text(text)


MakeProxy = Callable[[str], Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(start_app: StartApp, tmp_path: Path) -> AsyncIterator[MakeProxy]:
    """An in-process proxy on a real port, serving a routes.yaml written from ``text``."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(text: str) -> Proxy:
        path = tmp_path / f"routes-{len(sessions)}.yaml"
        path.write_text(text)
        holder = ConfigHolder(load_config(path), path)
        app = make_app(holder)
        url = await start_app(app)
        sessions.append(aiohttp.ClientSession())
        return Proxy(url, holder, path, sessions[-1], app)

    yield make
    for session in sessions:
        await session.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, wandb: Upstream, prime: Upstream) -> Proxy:
    return await make_proxy(routes_yaml(wandb, prime))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Skips are loud: a missing Prometheus must not pass unnoticed in a green run."""
    for report in terminalreporter.stats.get("skipped", []):
        _, _, reason = report.longrepr
        terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}", red=True, bold=True)
