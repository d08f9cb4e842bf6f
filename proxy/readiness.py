"""/readyz: the config is loaded and every provider marked ``required`` answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

from proxy.config import Config, Provider
from proxy.engines.registry import Engines

_CONNECT_TIMEOUT = 2.0


Probed = Callable[[Provider, bool], None]


async def readiness(config: Config, engines: Engines, probed: Probed | None = None) -> list[str]:
    """Problems, one line each; ``probed`` hears whether each provider's TCP probe reached it."""
    required = [p for p in config.providers.values() if p.required]
    results = await asyncio.gather(
        *(_provider_problem(p, probed) for p in required if p.engine is None)
    )
    problems = [_engine_problem(engines, p) for p in required if p.engine is not None]
    return [problem for problem in [*results, *problems] if problem]


def _engine_problem(engines: Engines, provider: Provider) -> str | None:
    """A required engine that runs needs a ready replica; one that is not running (first
    request not seen yet, or unloaded when idle) starts when a call comes."""
    supervisor = engines.supervisor(provider)
    if not supervisor.running or any(r.state == "ready" for r in supervisor.replicas):
        return None
    states = ", ".join(f"#{r.index} {r.state}" for r in supervisor.replicas)
    return f"engine '{provider.name}': no replica is ready ({states})"


async def _provider_problem(provider: Provider, probed: Probed | None) -> str | None:
    if provider.missing_key_var:
        variable = provider.missing_key_var
        return f"provider '{provider.name}': environment variable {variable} is not set"
    problem = await _connect_problem(provider)
    if probed is not None:
        probed(provider, problem is None)
    return problem


async def _connect_problem(provider: Provider) -> str | None:
    parts = urlsplit(provider.base_url)  # the first endpoint
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(parts.hostname, port)
    except (OSError, TimeoutError) as exc:
        return f"provider '{provider.name}': cannot connect to {parts.hostname}:{port} ({exc!r})"
    writer.close()
    return None
