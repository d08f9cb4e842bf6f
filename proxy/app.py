"""Build the aiohttp application: its state, its resources and its routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from aiohttp import web

from proxy.config.reload import ConfigHolder, watch_file
from proxy.engines.registry import running_engines
from proxy.engines.worker_view import own_view, write_view
from proxy.http.middlewares import calls
from proxy.http.routes import add_routes
from proxy.limits.admission import Accountant
from proxy.limits.ledger_file import LedgerFile
from proxy.limits.ledger_keeper import LedgerKeeper
from proxy.limits.memory import MemoryStore
from proxy.limits.redis_store import RedisStore
from proxy.observe.metrics import Metrics
from proxy.observe.tracing import close_tracing, open_tracing
from proxy.observe.worker_metrics import package_version
from proxy.routing.circuit_sync import CircuitSync
from proxy.services import SERVICES, Services
from proxy.upstream.client import UpstreamClient

log = logging.getLogger(__name__)


def make_app(holder: ConfigHolder) -> web.Application:
    app = web.Application(middlewares=[calls])
    app[SERVICES] = services = Services(holder, Metrics.from_env())
    holder.on_reload = services.metrics.config_reloaded
    # First in, so last out: the spans of every call, the drain's included, are flushed.
    app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_accounting)
    app.cleanup_ctx.append(_circuit_sharing)
    app.cleanup_ctx.append(_config_watcher)
    app.cleanup_ctx.append(_engines)
    app.cleanup_ctx.append(_worker_sampling)
    # Last: what the calls and the settlements of the drain recorded reaches the values.
    app.on_cleanup.append(_flush_metrics)
    add_routes(app)
    return app


async def _flush_metrics(app: web.Application) -> None:
    app[SERVICES].metrics.flush()


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    # Read at start, like redis.url: a reload that changes telemetry takes a restart.
    services = app[SERVICES]
    settings = services.config.current.telemetry
    if settings is None:  # off: nothing of OpenTelemetry is imported
        yield
        return
    services.tracing = tracing = open_tracing(settings, package_version())
    yield
    services.tracing = None
    await _bounded(close_tracing(tracing), "flushing the trace spans", seconds=5.0)


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    # Keep-alive pools per upstream origin, without a global limit: 500 concurrent
    # streams must not queue behind 100.
    app[SERVICES].upstream_client = client = UpstreamClient()
    yield
    client.close()


async def _accounting(app: web.Application) -> AsyncIterator[None]:
    # The store is chosen at start: changing redis.url (or the ledger file) takes a restart.
    services = app[SERVICES]
    settings = services.config.current.redis
    keeper = None
    if settings.urls:
        redis = RedisStore(settings.urls, settings.timeout, settings.ledger_replicas)
        accountant = Accountant(settings, redis, MemoryStore(), redis_metrics=services.metrics)
        log.info("ledger kept in Redis")
    else:
        store = MemoryStore()
        accountant = Accountant(settings, store, fallback=None)
        services.ledger = keeper = await _ledger_keeper(services, store)
    services.accountant = accountant
    tasks = [asyncio.create_task(accountant.flush_forever())]
    if keeper is not None:
        tasks.append(asyncio.create_task(keeper.write_forever(), name="ledger file"))
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await accountant.drain(deadline=5.0)
    if keeper is not None:  # after the drain: the last settlements are in the last write
        await keeper.close()
    if settings.urls:
        await _bounded(redis.close(), "closing the limiter's Redis connections")


async def _ledger_keeper(services: Services, store: MemoryStore) -> LedgerKeeper | None:
    """The ledger file of the embedded store, opened and read back; None: memory only.
    A file that cannot be opened stops the start (cli.py checks it before the workers)."""
    accounting = services.config.current.accounting
    if accounting.ledger_path is None:
        log.warning("ledger kept in memory only (no accounting.ledger_path): lost on restart")
        return None
    file = LedgerFile(accounting.ledger_path)
    keeper = LedgerKeeper(store, file, accounting.ledger_interval, services.metrics)
    restored = await keeper.open()
    log.info(
        "ledger kept in %s (SQLite, written every %ss; %d recent rows read back)",
        file.path, accounting.ledger_interval, restored,
    )  # fmt: skip
    return keeper


async def _circuit_sharing(app: web.Application) -> AsyncIterator[None]:
    settings = app[SERVICES].config.current.redis
    if not settings.urls:
        yield
        return
    sync = CircuitSync(settings.urls, app[SERVICES].breakers, settings.timeout)
    follower = asyncio.create_task(sync.follow())
    yield
    follower.cancel()
    await _bounded(asyncio.wait([follower]), "stopping the circuit subscription")
    await _bounded(sync.close(), "closing the circuit-sharing Redis connections")


async def _bounded(work: Awaitable[Any], what: str, seconds: float = 2.0) -> None:
    """Shutdown steps that wait on Redis must not hold a shutdown up: a client stuck in
    a subscription or a pool disconnect (seen, rarely, in tests) is left behind."""
    try:
        async with asyncio.timeout(seconds):
            await work
    except TimeoutError:
        log.warning("shutdown: gave up %s after %ss", what, seconds)


async def _config_watcher(app: web.Application) -> AsyncIterator[None]:
    holder = app[SERVICES].config
    task = asyncio.create_task(watch_file(holder)) if holder.path else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _worker_sampling(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_sample_every_second(app[SERVICES]), name="worker sampling")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _sample_every_second(services: Services) -> None:
    """This worker's process gauges, and under --workers its engines' view for the
    other workers' scrapes (engines/worker_view.py)."""
    metrics = services.metrics
    while True:
        metrics.worker.sample()
        if metrics.multiproc_dir is not None:
            view = own_view(services.engines, metrics.worker.worker)
            try:
                write_view(metrics.multiproc_dir, view)
            except OSError as exc:  # the directory went away: shutting down
                log.debug("engine view not written: %s", exc)
        await asyncio.sleep(1.0)


async def _engines(app: web.Application) -> AsyncIterator[None]:
    # Last in, first out: engines stop before the upstream client closes, after the
    # server stopped taking calls and the calls in flight finished.
    async with running_engines(app[SERVICES].config, app[SERVICES].metrics) as engines:
        app[SERVICES].engines = engines
        yield
