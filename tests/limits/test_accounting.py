"""Admission and settlement (accounting.py) where the mutation run (docs/TESTING.md) found
them unchecked: what a refusal says, and the fallback's bookkeeping while Redis is down.
In-process proxies on real sockets, a fake upstream, the Redis backend on a real
redis-server or on a port where none listens."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from proxy.config.model import RedisSettings
from proxy.limits.admission import Accountant, Ticket
from proxy.limits.memory import MemoryStore
from proxy.limits.store import DAY, LEDGER_FIELDS, Admission
from proxy.limits.usage import Usage
from proxy.services import SERVICES
from tests.conftest import MakeProxy
from tests.support import Upstream, dead_url, routes_yaml
from tests.support.teams import OPS_KEY, MakeTeamProxy, chat, team_yaml


async def test_a_refusal_names_the_model_only_for_a_model_limit(team_proxy: MakeTeamProxy):
    proxy = await team_proxy(
        limits="{requests_per_minute: 2}", model_limits="{llama-70b: {requests_per_minute: 1}}"
    )
    assert (await chat(proxy, model="llama-70b"))[0] == 200
    status, body, _ = await chat(proxy, model="llama-70b")
    assert status == 429
    message = json.loads(body)["error"]["message"]
    assert "the team's requests_per_minute limit of 1 for model 'llama-70b' is" in message
    assert (await chat(proxy, model="llama-8b"))[0] == 200
    status, body, _ = await chat(proxy, model="llama-8b")
    assert status == 429
    message = json.loads(body)["error"]["message"]
    assert "the team's requests_per_minute limit of 2 is used up" in message, message


async def test_while_redis_is_down_calls_are_admitted_booked_and_queued_quietly(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    # fail_open: this process's own limits admit, the ledger writes wait in the queue.
    url = _dead_redis()
    limits = "{requests_per_minute: 100}"
    proxy = await make_proxy(routes_yaml(wandb, prime) + team_yaml(limits, redis_url=url))
    caplog.set_level(logging.INFO, logger="proxy.limits.admission")
    for send_usage in (True, True, False):  # the last one is billed on estimates
        wandb.fake.send_usage = send_usage
        assert (await chat(proxy))[0] == 200
    accountant = proxy.app[SERVICES].accountant
    await accountant.settled()
    # Each admission failed; the first settlement too, and the others queued behind it.
    assert len(accountant.queue) == 3 and accountant.redis_errors == 3 + 1
    assert [s.estimated for s in accountant.queue] == [False, False, True]
    assert {s.team_checks.checks for s in accountant.queue} == {
        ()
    }  # the limits were this process's
    assert accountant.queue[2].prompt_tokens > 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    ours = [r for r in caplog.records if r.name == "proxy.limits.admission"]
    warnings = [r.getMessage() for r in ours if r.levelno == logging.WARNING]
    assert warnings and warnings[0].startswith("redis failed during admission (1 errors so far)")
    assert "cannot connect to Redis" in warnings[0]  # and why
    # A shutdown that cannot reach Redis logs each lost write whole: the only record left.
    caplog.clear()
    await accountant.drain(0.1)
    lost = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    prefix = "ledger write lost at shutdown: "
    assert [m.startswith(prefix) for m in lost] == [True] * 3
    booked = [json.loads(m.removeprefix(prefix)) for m in lost]
    assert [b["request_id"] for b in booked] == [s.request_id for s in accountant.queue]
    assert booked[2]["estimated"] is True and booked[2]["completion_tokens"] > 0


def _dead_redis() -> str:
    return "redis://" + dead_url("").removeprefix("http://")


async def test_while_redis_is_down_each_team_keeps_its_own_fallback_limits(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    teams = team_yaml("{requests_per_minute: 1}", redis_url=_dead_redis())
    teams += "    limits: {requests_per_minute: 1}\n"  # ops's, the same
    proxy = await make_proxy(routes_yaml(wandb, prime) + teams)
    status, _, headers = await chat(proxy)
    assert (status, headers["x-ratelimit-remaining-requests"]) == (200, "0")  # the fallback's
    assert (await chat(proxy))[0] == 429
    assert (await chat(proxy, key=OPS_KEY))[0] == 200


async def test_fail_closed_says_why_it_refuses(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    teams = team_yaml("{requests_per_minute: 1}", redis_url=_dead_redis(), on_error="fail_closed")
    proxy = await make_proxy(routes_yaml(wandb, prime) + teams)
    status, body, _ = await chat(proxy)
    assert status == 503
    assert json.loads(body)["error"]["message"] == (
        "The rate limiter is unavailable and this proxy is set to fail closed."
    )
    assert wandb.fake.seen == []


async def test_while_redis_is_down_a_finished_call_frees_its_slot(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream
):
    teams = team_yaml("{concurrent: 1}", redis_url=_dead_redis())
    proxy = await make_proxy(routes_yaml(wandb, prime) + teams)
    assert [(await chat(proxy))[0] for _ in range(3)] == [200] * 3


async def test_a_failed_settlement_is_logged_with_its_cause(
    make_proxy: MakeProxy, wandb: Upstream, prime: Upstream, caplog: pytest.LogCaptureFixture
):
    # No limits: admission needs no Redis, so the settlement meets the outage first.
    proxy = await make_proxy(routes_yaml(wandb, prime) + team_yaml(redis_url=_dead_redis()))
    caplog.set_level(logging.INFO, logger="proxy.limits.admission")
    assert (await chat(proxy))[0] == 200
    await proxy.app[SERVICES].accountant.settled()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "proxy.limits.admission"]
    assert warning.startswith("redis failed during settlement (1 errors so far): Disconnected")


async def test_a_ledger_read_started_between_two_answers_of_one_loop_turn_sees_both():
    # The read's first step lands between the two settlements' callbacks: it must wait
    # for the second too (settled() counts the callbacks not run yet).
    store = MemoryStore()
    accountant = Accountant(RedisSettings(), store, fallback=None)
    day = int(time.time() // DAY)

    def ticket(request_id: str) -> Ticket:
        checks = store.prepare("research", ())
        return Ticket("research", "llama-8b", request_id, checks, 10, 5, Admission(True, day))

    async def read() -> int:
        await accountant.settled()
        rows = await store.ledger(["research"], day, day)
        return sum(row.counts[LEDGER_FIELDS.index("requests")] for row in rows)

    accountant.settle_soon(ticket("first"), Usage(5, 3))
    reader = asyncio.ensure_future(read())
    accountant.settle_soon(ticket("second"), Usage(5, 3))
    assert await reader == 2
