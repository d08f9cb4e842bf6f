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
    engines: Engines, provider: Provider, hint: Hint | None
) -> AsyncIterator[tuple[Provider, Choice | None]]:
    """Yield the provider to call; for an engine, one replica is leased for the whole call,
    chosen with the call's ``hint`` (and cache_aware's estimate of its prefix hit).

    Raises ``EngineUnavailable`` (503) when no replica gets ready within ``engine.wait``.
    """
    if provider.engine is None:
        yield provider, None
        return
    async with engines.supervisor(provider).lease(hint) as (replica, choice):
        yield dataclasses.replace(provider, endpoints=(Endpoint(replica.base_url),)), choice
