"""The seam between forwarding and engines: a provider with the URL of a leased replica."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from proxy.config.model import Endpoint, Provider
from proxy.engines.registry import Engines


@contextlib.asynccontextmanager
async def served_by(engines: Engines, provider: Provider) -> AsyncIterator[Provider]:
    """Yield the provider to call; for an engine, one replica is leased for the whole call.

    Raises ``EngineUnavailable`` (503) when no replica gets ready within ``engine.wait``.
    """
    if provider.engine is None:
        yield provider
        return
    async with engines.supervisor(provider).lease() as replica:
        yield dataclasses.replace(provider, endpoints=(Endpoint(replica.base_url),))
