"""The engines of the running config: one supervisor per engine provider, kept in step.

A housekeeping loop follows the config: engines of a new or changed provider start (at
once when ``start: boot``), and those of a removed or changed one are stopped once no
call holds a lease on them, so a reload never cuts off a call in flight. The same loop
unloads idle engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp

from proxy.config.engine import EngineSpec
from proxy.config.model import Config, Provider
from proxy.config.reload import ConfigHolder
from proxy.engines.fair_queue import QueueObserver
from proxy.engines.supervisor import EngineSupervisor

log = logging.getLogger(__name__)

_HOUSEKEEPING_INTERVAL = 1.0


class Engines:
    def __init__(
        self,
        holder: ConfigHolder,
        session: aiohttp.ClientSession,
        observer: QueueObserver | None = None,
    ):
        self.holder = holder
        self.session = session
        self.observer = observer
        self.supervisors: dict[str, EngineSupervisor] = {}
        self._retired: list[EngineSupervisor] = []
        self._synced: Config | None = None

    def supervisor(self, provider: Provider) -> EngineSupervisor:
        """The supervisor running this provider's engine as the call's config describes it.

        A call that started on an older config gets the engine of that config (retired
        but still running for it), never a restart of the current one. Its slots and
        queue are the running config's (``sync`` applies a reload's in place).
        """
        assert provider.engine is not None
        for known in [self.supervisors.get(provider.name), *self._retired]:
            if (
                known is not None
                and known.name == provider.name
                and known.spec.runs_like(provider.engine)
            ):
                return known
        created = EngineSupervisor(provider.name, provider.engine, self.session, self.observer)
        if provider.name in self.supervisors:
            self._retired.append(created)  # stopped again when that call is done
        else:
            self.supervisors[provider.name] = created
        return created

    def sync(self, config: Config) -> None:
        if config is self._synced:
            return
        self._synced = config
        specs: dict[str, EngineSpec] = {
            p.name: p.engine for p in config.providers.values() if p.engine is not None
        }
        for name, running in list(self.supervisors.items()):
            spec = specs.get(name)
            if spec is not None and spec != running.spec and spec.runs_like(running.spec):
                log.info("engine %s: slots or queue changed; applied without a restart", name)
                running.reconfigure(spec)
            elif spec != running.spec:
                log.info("engine %s: changed or removed in the config; stops when idle", name)
                self._retired.append(self.supervisors.pop(name))
        for provider in config.providers.values():
            if provider.engine is not None and provider.engine.start == "boot":
                self.supervisor(provider).start()

    async def housekeeping(self) -> None:
        while True:
            try:
                await self._tidy()
            except Exception:  # a bug here must not end engine housekeeping for good
                log.exception("engine housekeeping failed; trying again")
            await asyncio.sleep(_HOUSEKEEPING_INTERVAL)

    async def _tidy(self) -> None:
        self.sync(self.holder.current)
        for supervisor in list(self.supervisors.values()):
            await supervisor.unload_if_idle()
        for supervisor in [s for s in self._retired if not s.busy()]:
            await supervisor.stop()
            # Only now: if shutdown cancels this wait, close() still finds it and waits.
            self._retired.remove(supervisor)

    async def close(self) -> None:
        everything = [*self.supervisors.values(), *self._retired]
        self.supervisors.clear()
        self._retired.clear()
        await asyncio.gather(*(s.stop() for s in everything))


@contextlib.asynccontextmanager
async def running_engines(
    holder: ConfigHolder, observer: QueueObserver | None = None
) -> AsyncIterator[Engines]:
    """Engines for the app's lifetime: every process is stopped when the app shuts down."""
    # A session of its own: ready checks and metrics scrapes are short and local, and
    # must not wait behind (or be closed before) the upstream pool.
    async with aiohttp.ClientSession(trust_env=False) as session:
        engines = Engines(holder, session, observer)
        engines.sync(holder.current)
        task = asyncio.create_task(engines.housekeeping(), name="engine housekeeping")
        try:
            yield engines
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await engines.close()
