"""The proxied call, step by step (docs/ARCHITECTURE.md): authenticate, read, resolve,
admit, forward, settle."""

from __future__ import annotations

from proxy.call.auth import authenticate
from proxy.call.caps import capped
from proxy.call.exchange import Exchange, Outcome
from proxy.call.forward import Call, forward
from proxy.call.headers import NOT_TO_UPSTREAM, check_forwardable, not_forwarded
from proxy.call.record import CallRecord
from proxy.call.request import Api, checked_body, resolve_model, time_budget
from proxy.call.traced import traced_call
from proxy.errors import RateLimited
from proxy.limits.admission import LeaseKeeper
from proxy.limits.budget_report import show_budgets
from proxy.limits.cost import cost_micros, worst_case
from proxy.limits.rate_headers import rate_headers
from proxy.limits.store import NO_KEY
from proxy.limits.usage import estimate_prompt, final_usage, reservation


async def proxied_call(exchange: Exchange, api: Api, record: CallRecord) -> Outcome:
    record.api = api.path
    services = exchange.services
    in_flight = services.metrics.c_in_flight
    in_flight.inc()
    try:
        if services.tracing is None:
            return await _call(exchange, api, record)
        return await traced_call(services.tracing, _call, exchange, api, record)
    finally:
        in_flight.dec()


async def _call(exchange: Exchange, api: Api, record: CallRecord) -> Outcome:
    services = exchange.services
    config = services.config.current  # this call's config, even if a reload swaps it
    accountant = services.accountant
    authenticate(exchange.headers, config, record, services.clock)  # 1
    team = config.teams.get(record.team)  # None only when no team is configured
    dropped = not_forwarded(team.client_headers) if team else NOT_TO_UPSTREAM
    check_forwardable(exchange.headers, dropped)
    body = checked_body(await exchange.read_body(config.server), api)  # 2
    record.model = body.fields["model"]
    model = resolve_model(config, body.fields["model"], team)  # 3
    record.route = model.id
    body = capped(body, model, api)  # 3b: the model's max_tokens, refused or added
    prompt = estimate_prompt(body.fields)
    most = model.max_tokens.default if model.max_tokens else config.accounting.default_max_tokens
    reserved = reservation(body.fields, prompt, most)
    # Only a team with budgets pays for its calls' worst case (and their gauges).
    budgeted = team is not None and bool(team.budget or team.model_budgets)
    cost = worst_case(prompt, reserved, (t.price for t in model.targets)) if budgeted else 0
    try:
        ticket = await accountant.admit(  # 4
            config, record.team, model.id, reserved, prompt, record.request_id, cost
        )
    except RateLimited as refused:
        services.metrics.rate_limit_rejected(record.team, refused.param or "unknown")
        raise
    record.rate_headers = rate_headers(ticket.admission)
    if budgeted:
        show_budgets(services.metrics, record.team, ticket.admission)
    seconds = time_budget(exchange.headers, model.budget)
    call = Call(config, model, api.path, body, seconds, team.headers if team else {}, dropped)
    try:
        with LeaseKeeper(accountant, ticket):
            return await forward(exchange, call, record)  # 5
    finally:
        record.billed = final_usage(
            ticket.prompt_estimate, record.usage, record.completion_estimate
        )
        record.cost += cost_micros(record.billed, record.price)  # the served target's price
        accountant.settle_soon(ticket, record.billed, record.cost, record.key or NO_KEY)  # 6
