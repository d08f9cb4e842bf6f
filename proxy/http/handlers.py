"""The handlers of the proxy's own endpoints: models, health, readiness, usage, metrics."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.call.auth import authenticate, bearer, key_hash, require_admin
from proxy.call.request import resolve_model, team_models
from proxy.config.model import ANONYMOUS, Config, Model, Provider, Team
from proxy.engines.worker_view import engines_text
from proxy.errors import AdminOnly, LimiterUnavailable, ProviderUnavailable
from proxy.http.middlewares import RECORD
from proxy.limits.ledger import day_range, ledger_report
from proxy.limits.store import StoreUnavailable
from proxy.observe.metrics import endpoint_label
from proxy.readiness import readiness
from proxy.services import SERVICES, Services


def _model_entry(config: Config, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": config.models[model_id].owned_by,
        "root": model_id,
    }


async def list_models(request: web.Request) -> web.Response:
    """The caller's models (with teams, a key is needed), less those that cannot serve."""
    config, team = _caller(request)
    data = [
        _model_entry(config, model_id)
        for model_id in team_models(config, team)
        if not keys_missing(config, config.models[model_id])
    ]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    config, team = _caller(request)
    model_id = request.match_info["model"]
    model = resolve_model(config, model_id, team)
    missing = keys_missing(config, model)
    if missing:
        unset = (
            f"variable {missing[0]} is"
            if len(missing) == 1
            else f"variables {', '.join(missing)} are"
        )
        raise ProviderUnavailable(
            f"The model '{model_id}' cannot answer now: none of its providers has its API "
            f"key (the environment {unset} not set)."
        )
    return web.json_response(_model_entry(config, model_id))


def _caller(request: web.Request) -> tuple[Config, Team | None]:
    """This request's config, and its caller's team (None without teams) once its key is
    checked like a call's."""
    services = request.app[SERVICES]
    config = services.config.current
    record = request[RECORD]
    authenticate(request.headers, config, record, services.clock)
    return config, config.teams.get(record.team)


def keys_missing(config: Config, model: Model) -> list[str]:
    """The unset key variables that stop every target of ``model``, or [] if one can serve.
    Such a model is left out of /v1/models: a client that picks from the list must not
    pick one that can only fail with 503."""
    missing = [config.providers[t.provider].missing_key_var for t in model.targets]
    if not all(missing):
        return []
    return sorted({name for name in missing if name})


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
    """GET /v1/usage?team=&from=YYYY-MM-DD&to=YYYY-MM-DD: the ledger, and what is left
    of the budgets. The admin key sees every team; a team's key, its own team."""
    services = request.app[SERVICES]
    config = services.config.current
    teams = _usage_teams(request, config)
    first, last = day_range(request.query.get("from"), request.query.get("to"))
    await services.accountant.settled()  # every call this process answered is in what it reads
    keeper = services.ledger
    try:
        if keeper is not None:  # the file: every worker's rows
            rows = await keeper.ledger(teams, first, last)
        else:
            rows = await services.accountant.primary.ledger(teams, first, last)
        budgets = {team: await services.accountant.budgets(config, team) for team in teams}
    except StoreUnavailable as exc:
        raise LimiterUnavailable(f"The ledger cannot be read now: {exc}") from None
    report = ledger_report(rows, first, last)
    return web.json_response({**report, "budgets": budgets, "ledger": _where(services)})


def _usage_teams(request: web.Request, config: Config) -> list[str]:
    """The teams the caller may see: with the admin key, those asked for (all by
    default); with a team's key, its own."""
    asked = request.query.get("team")
    key = bearer(request.headers)
    # Team keys are ASCII; anything else (a byte aiohttp kept as a surrogate) is no
    # team's and goes to the admin check, which compares it byte for byte.
    if key is None or not key.isascii() or key_hash(key) not in config.key_index:
        require_admin(request.headers, config)  # 403 unless it is the admin key
        return [asked] if asked else [*config.teams, ANONYMOUS]
    _, team = _caller(request)  # a team's key, checked like a call's (expiry)
    assert team is not None
    if asked not in (None, team.name):
        raise AdminOnly(
            f"A team's key shows its own team's usage only ('{team.name}'); the admin "
            "key shows every team's."
        )
    return [team.name]


def _where(services: Services) -> dict[str, Any]:
    """Where the ledger this answer read lives."""
    if services.ledger is not None:
        return services.ledger.where()
    return {"store": "redis" if services.config.current.redis.urls else "memory"}


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
