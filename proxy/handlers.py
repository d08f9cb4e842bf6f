"""Request handlers. Each reads like the path of a call in DESIGN.md."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.appkeys import CONFIG, ENGINES
from proxy.config import Config
from proxy.forward import Call, forward
from proxy.middlewares import RECORD
from proxy.readiness import readiness
from proxy.request_checks import Endpoint, checked_body, read_body, route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def proxied(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        config = request.app[CONFIG].current  # this call's config, even if a reload swaps it
        record = request[RECORD]
        raw = await read_body(request, config.server.max_body_bytes)
        body = checked_body(raw, endpoint)
        record.model = body.fields["model"]
        model = route(config, body.fields["model"])
        return await forward(request, Call(config, model, endpoint.path, body), record)

    handle.__name__ = f"proxy_{endpoint.path.replace('/', '_')}"
    return handle


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
    problems = await readiness(config, request.app[ENGINES])
    status = 503 if problems else 200
    body = {
        "status": "not ready" if problems else "ready",
        "problems": problems,
        "models": len(config.models),
    }
    return web.json_response(body, status=status)
