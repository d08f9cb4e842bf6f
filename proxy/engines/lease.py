"""The seam between forwarding and engines: a provider with the URL of a leased replica."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from proxy.config.model import Endpoint, Provider
from proxy.engines.registry import Engines
from proxy.routing.balance import Hint
from proxy.routing.cache_aware import Choice


@contextlib.asynccontextmanager
async def served_by(
    engines: Engines,
    provider: Provider,
    hint: Hint | None,
    team: str = "",
    weight: float = 1.0,
    deadline: float | None = None,
) -> AsyncIterator[tuple[Provider, Choice | None]]:
    """Yield the provider to call; for an engine, one replica is leased for the whole call,
    after the team's turn in the engine's fair queue, chosen with the call's ``hint``
    (and cache_aware's estimate of its prefix hit).

    Raises ``EngineUnavailable`` (503) when no replica gets ready within ``engine.wait``,
    ``EngineBusy`` (429) when the queue is full or the wait for a slot runs out (at
    ``engine.queue.wait``, or the call's ``deadline`` if sooner).
    """
    if provider.engine is None:
        yield provider, None
        return
    supervisor = engines.supervisor(provider)
    admitted = supervisor.admitted(team, weight, deadline)
    async with admitted, supervisor.lease(hint) as (replica, choice):
        yield dataclasses.replace(provider, endpoints=(Endpoint(replica.base_url),)), choice
