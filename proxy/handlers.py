"""Request handlers. Each reads like the path of a call in DESIGN.md."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.appkeys import CONFIG, METRICS
from proxy.config import Config, Provider
from proxy.forward import Call, forward
from proxy.metrics import endpoint_label
from proxy.middlewares import RECORD
from proxy.readiness import readiness
from proxy.record import CallRecord
from proxy.request_checks import Endpoint, checked_body, read_body, route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def proxied(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        record = request[RECORD]
        record.endpoint = endpoint.path
        in_flight = request.app[METRICS].in_flight
        in_flight.inc()
        try:
            return await _proxy(request, endpoint, record)
        finally:
            in_flight.dec()

    handle.__name__ = f"proxy_{endpoint.path.replace('/', '_')}"
    return handle


async def _proxy(
    request: web.Request, endpoint: Endpoint, record: CallRecord
) -> web.StreamResponse:
    config = request.app[CONFIG].current  # this call's config, even if a reload swaps it
    raw = await read_body(request, config.server.max_body_bytes)
    body = checked_body(raw, endpoint)
    record.model = body.fields["model"]
    model = route(config, body.fields["model"])
    record.route = model.id
    return await forward(request, Call(config, model, endpoint.path, body), record)


def _model_entry(config: Config, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": config.models[model_id].owned_by,
        "root": model_id,
    }


async def list_models(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    data = [_model_entry(config, model_id) for model_id in config.models]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    model_id = request.match_info["model"]
    route(config, model_id)
    return web.json_response(_model_entry(config, model_id))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    config = request.app[CONFIG].current
    metrics = request.app[METRICS]

    def probed(provider: Provider, reached: bool) -> None:
        metrics.endpoint_health(provider.name, endpoint_label(provider.base_url), reached)

    problems = await readiness(config, probed)
    status = 503 if problems else 200
    body = {
        "status": "not ready" if problems else "ready",
        "problems": problems,
        "models": len(config.models),
    }
    return web.json_response(body, status=status)


async def scrape_metrics(request: web.Request) -> web.Response:
    exported = request.app[METRICS]
    # Multiprocess mode reads every worker's files: keep that off the event loop.
    scrape = exported.scrape
    text = await asyncio.to_thread(scrape) if exported.multiproc_dir else scrape()
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})
