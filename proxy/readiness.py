"""/readyz: the config is loaded and every provider marked ``required`` answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from proxy.config.model import Config, Provider
from proxy.engines.registry import Engines

_CONNECT_TIMEOUT = 2.0
# /readyz needs no key: without this, each call would open a connection to every
# required provider, and a flood of them would be a flood of connections.
PROBE_TTL = 1.0


Probed = Callable[[Provider, bool], None]
Address = tuple[str, int]


class Probes:
    """The TCP probes of one process, shared by its /readyz calls: one probe of an address
    at a time, and a new one at most every ``PROBE_TTL`` seconds (counted from the start
    of the last, so a probe that times out is not started again at once either)."""

    def __init__(self) -> None:
        self._last: dict[Address, tuple[float, asyncio.Task[str | None]]] = {}

    async def failure(self, address: Address) -> str | None:
        """Why the address cannot be reached (None: it can), from the latest probe."""
        now = time.monotonic()
        started, task = self._last.get(address, (now - PROBE_TTL, None))
        if task is None or now - started >= PROBE_TTL:
            task = asyncio.create_task(_connect_failure(address))
            self._last[address] = (now, task)
        # Shielded: a /readyz call cancelled by its client must not cancel the shared probe.
        return await asyncio.shield(task)


async def readiness(
    config: Config, engines: Engines, probes: Probes, probed: Probed | None = None
) -> list[str]:
    """Problems, one line each; ``probed`` hears whether each provider's TCP probe reached it."""
    required = [p for p in config.providers.values() if p.required]
    results = await asyncio.gather(
        *(_provider_problem(p, probes, probed) for p in required if p.engine is None)
    )
    problems = [_engine_problem(engines, p) for p in required if p.engine is not None]
    return [problem for problem in [*results, *problems] if problem]


def _engine_problem(engines: Engines, provider: Provider) -> str | None:
    """A required engine that runs needs a ready replica; one that is not running (first
    request not seen yet, or unloaded when idle) starts when a call comes."""
    supervisor = engines.supervisor(provider)
    if not supervisor.running or any(r.state == "ready" for r in supervisor.replicas):
        return None
    return f"engine '{provider.name}': no replica is ready ({supervisor.describe()})"


async def _provider_problem(
    provider: Provider, probes: Probes, probed: Probed | None
) -> str | None:
    if provider.missing_key_var:
        variable = provider.missing_key_var
        return f"provider '{provider.name}': environment variable {variable} is not set"
    parts = urlsplit(provider.base_url)  # the first endpoint
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    failure = await probes.failure((host, port))
    if probed is not None:
        probed(provider, failure is None)
    if failure is None:
        return None
    return f"provider '{provider.name}': cannot connect to {host}:{port} ({failure})"


async def _connect_failure(address: Address) -> str | None:
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(*address)
    except (OSError, TimeoutError) as exc:
        return repr(exc)
    writer.close()
    return None
