"""One replica of an engine: start it, wait until it is ready, restart it when it dies.

A replica's run loop owns its process from spawn to reap. It is stopped by cancelling
the loop, whose ``finally`` stops the process group, so no path leaves a process behind.
Counters live on ``ReplicaStats`` as plain numbers for the metrics exporter to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from proxy.config.engine import EngineSpec
from proxy.engines.probe import NotReady, wait_ready
from proxy.engines.process import spawn, terminate

log = logging.getLogger(__name__)

STATES = ("stopped", "starting", "ready", "stopping", "backoff")


@dataclass
class ReplicaStats:
    """Mutable on purpose: counters since the proxy started, read by the metrics hook."""

    starts: int = 0  # processes spawned
    crashes: int = 0  # exits and failed starts the proxy did not ask for
    restarts: int = 0  # starts after a crash
    last_exit: str = ""
    last_start_seconds: float | None = None  # spawn → ready, last time


class Replica:
    def __init__(
        self,
        engine: str,
        index: int,
        spec: EngineSpec,
        session: aiohttp.ClientSession,
        on_change: Callable[[], None],
    ):
        self.engine = engine
        self.index = index
        self.label = f"{engine}#{index}"
        self.spec = spec
        self.state = "stopped"
        self.port: int | None = None
        self.pid: int | None = None
        self.in_flight = 0
        self.stats = ReplicaStats()
        self._session = session
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + self.spec.api_path

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"engine {self.label}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _set(self, state: str) -> None:
        self.state = state
        self._on_change()

    async def _run(self) -> None:
        failures = 0
        try:
            while True:
                began = time.monotonic()
                reason = await self._run_once()
                self.stats.crashes += 1
                self.stats.last_exit = reason
                # A replica that stayed up for a while starts its backoff afresh.
                if time.monotonic() - began > self.spec.restart.max_delay:
                    failures = 0
                failures += 1
                delay = min(
                    self.spec.restart.base_delay * 2 ** (failures - 1), self.spec.restart.max_delay
                )
                log.error("engine %s %s; restarting in %.1fs", self.label, reason, delay)
                self._set("backoff")
                await asyncio.sleep(delay)
                self.stats.restarts += 1
        finally:
            self._set("stopped")
            log.info("engine %s stopped", self.label)

    async def _run_once(self) -> str:
        """Run one process until it exits; returns why it is gone."""
        self.port = self.spec.replica_port(self.index) or free_port(self.spec.host)
        if self.spec.port is not None and port_in_use(self.spec.host, self.port):
            return f"cannot start: port {self.port} is already in use"
        argv = self.argv()
        self._set("starting")
        log.info("engine %s starting on port %s: %s", self.label, self.port, " ".join(argv))
        try:
            process, pump = await spawn(argv, self.spec.env, self.label)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot start {argv[0]!r}: {exc}"
        self.stats.starts += 1
        self.pid = process.pid
        began = time.monotonic()
        try:
            url = self.root_url + self.spec.ready.path
            await wait_ready(self._session, url, self.spec.ready, process)
            self.stats.last_start_seconds = time.monotonic() - began
            log.info(
                "engine %s ready on %s (pid %s) after %.1fs",
                *(self.label, self.base_url, process.pid, self.stats.last_start_seconds),
            )
            self._set("ready")
            return _exit_reason(await process.wait())
        except NotReady as exc:
            return f"failed to start: {exc}"
        finally:
            # Not routable from here on, even while the stop below takes its time.
            self.state = "stopping"
            await terminate(process, self.spec.stop_timeout, self.label)
            await _finish(pump)
            self.pid = None

    def argv(self) -> list[str]:
        values = {
            "{port}": str(self.port),
            "{host}": self.spec.host,
            "{python}": sys.executable,
            "{replica}": str(self.index),
        }
        out = []
        for part in self.spec.command:
            for key, value in values.items():
                part = part.replace(key, value)
            out.append(part)
        return out


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"exited on signal {signal.Signals(-code).name}"
    except ValueError:
        return f"exited on signal {-code}"


async def _finish(pump: asyncio.Task[None]) -> None:
    # The pipe closes when the group is gone; do not wait on a grandchild that kept it.
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(pump, 2.0)


def free_port(host: str) -> int:
    # The port is free now; a race with another program is caught by the ready check
    # (the engine fails to bind and exits) and ends in a restart on a fresh port.
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
