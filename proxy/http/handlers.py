"""The handlers of the proxy's own endpoints: models, health, readiness, usage, metrics."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.call.auth import require_admin
from proxy.call.request import resolve_model
from proxy.config.model import ANONYMOUS, Config, Provider
from proxy.engines.worker_view import engines_text
from proxy.errors import LimiterUnavailable
from proxy.limits.ledger import day_range, ledger_report
from proxy.limits.store import StoreUnavailable
from proxy.observe.metrics import endpoint_label
from proxy.readiness import readiness
from proxy.services import SERVICES


def _model_entry(config: Config, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": config.models[model_id].owned_by,
        "root": model_id,
    }


async def list_models(request: web.Request) -> web.Response:
    config = request.app[SERVICES].config.current
    data = [_model_entry(config, model_id) for model_id in config.models]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    config = request.app[SERVICES].config.current
    model_id = request.match_info["model"]
    resolve_model(config, model_id)
    return web.json_response(_model_entry(config, model_id))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    config = services.config.current

    def probed(provider: Provider, reached: bool) -> None:
        services.metrics.endpoint_health(provider.name, endpoint_label(provider.base_url), reached)

    problems = await readiness(config, services.engines, services.probes, probed)
    status = 503 if problems else 200
    body = {
        "status": "not ready" if problems else "ready",
        "problems": problems,
        "models": len(config.models),
    }
    return web.json_response(body, status=status)


async def usage(request: web.Request) -> web.Response:
    """GET /v1/usage?team=&from=YYYY-MM-DD&to=YYYY-MM-DD (admin key): the ledger."""
    config = request.app[SERVICES].config.current
    require_admin(request.headers, config)
    teams = [request.query["team"]] if "team" in request.query else [*config.teams, ANONYMOUS]
    first, last = day_range(request.query.get("from"), request.query.get("to"))
    accountant = request.app[SERVICES].accountant
    await accountant.settled()  # every call this process answered is in what it reads
    try:
        rows = await accountant.primary.ledger(teams, first, last)
    except StoreUnavailable as exc:
        raise LimiterUnavailable(f"The ledger cannot be read now: {exc}") from None
    return web.json_response(ledger_report(rows, first, last))


async def scrape_metrics(request: web.Request) -> web.Response:
    exported = request.app[SERVICES].metrics
    # Multiprocess mode reads every worker's files: keep that off the event loop.
    exported.flush()  # here, in the loop's thread; rendering may go to another
    exported.worker.sample()
    render = exported.render
    text = await asyncio.to_thread(render) if exported.multiproc_dir else render()
    # Every worker's engines: their state, and their own metrics, labelled.
    engines = request.app[SERVICES].engines
    worker = exported.worker.worker
    text += (await engines_text(engines, exported.multiproc_dir, worker)).encode()
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
