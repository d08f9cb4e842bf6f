"""The proxied call, step by step as in DESIGN.md: authenticate, read, route, admit,
forward, settle."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.accounting import LeaseKeeper, final_usage, reservation
from proxy.appkeys import ACCOUNTANT, CONFIG, METRICS
from proxy.auth import authenticate
from proxy.errors import RateLimited
from proxy.forward import Call, forward
from proxy.middlewares import RECORD
from proxy.rate_headers import rate_headers
from proxy.record import CallRecord
from proxy.request_checks import Endpoint, call_budget, checked_body, read_body, route
from proxy.usage import estimate_prompt

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def proxied(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        record = request[RECORD]
        record.api = endpoint.path
        in_flight = request.app[METRICS].in_flight
        in_flight.inc()
        try:
            return await _call(request, endpoint, record)
        finally:
            in_flight.dec()

    handle.__name__ = f"proxy_{endpoint.path.replace('/', '_')}"
    return handle


async def _call(request: web.Request, endpoint: Endpoint, record: CallRecord) -> web.StreamResponse:
    config = request.app[CONFIG].current  # this call's config, even if a reload swaps it
    accountant = request.app[ACCOUNTANT]
    record.team = authenticate(request, config)  # 1
    body = checked_body(await read_body(request, config.server), endpoint)  # 2
    record.model = body.fields["model"]
    model = route(config, body.fields["model"])  # 3
    record.route = model.id
    prompt = estimate_prompt(body.fields)
    reserved = reservation(body.fields, prompt, config.accounting.default_max_tokens)
    try:
        ticket = await accountant.admit(  # 4
            config, record.team, model.id, reserved, prompt, record.request_id
        )
    except RateLimited as refused:
        request.app[METRICS].rate_limit_rejected(record.team, refused.param or "unknown")
        raise
    record.rate_headers = rate_headers(ticket.admission)
    team = config.teams.get(record.team)
    call = Call(config, model, endpoint.path, body, call_budget(request, model.budget),
                provider_headers=team.headers if team else {})  # fmt: skip
    try:
        with LeaseKeeper(accountant, ticket):
            return await forward(request, call, record)  # 5
    finally:
        record.billed = final_usage(ticket, record.usage, record.completion_estimate)
        await accountant.settle_surely(ticket, record.billed)  # 6
