"""Build the aiohttp application: its state, its resources and its routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.appkeys import CLIENT_SESSION, CONFIG, ENGINES
from proxy.engines.registry import running_engines
from proxy.middlewares import add_request_id, calls
from proxy.reload import ConfigHolder, watch_file
from proxy.routes import add_routes


def make_app(holder: ConfigHolder) -> web.Application:
    app = web.Application(middlewares=[calls])
    app[CONFIG] = holder
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_config_watcher)
    app.cleanup_ctx.append(_engines)
    app.on_response_prepare.append(add_request_id)
    add_routes(app)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # One pooled keep-alive session for every upstream; the connector keeps a pool
    # per host. No global limit: 500 concurrent streams must not queue behind 100.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
    )
    app[CLIENT_SESSION] = session
    yield
    await session.close()


async def _config_watcher(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(watch_file(app[CONFIG])) if app[CONFIG].path else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _engines(app: web.Application) -> AsyncIterator[None]:
    # Last in, first out: engines stop before the client session closes, after the
    # server stopped taking calls and the calls in flight finished.
    async with running_engines(app[CONFIG]) as engines:
        app[ENGINES] = engines
        yield
