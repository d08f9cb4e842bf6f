"""Run the proxy: one worker process, or N of them sharing the port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from aiohttp import web
from prometheus_client import multiprocess

from proxy.app import make_app
from proxy.config.exposure import Exposure, load_to_serve
from proxy.config.load import ConfigError
from proxy.config.model import ServerSettings
from proxy.config.reload import ConfigHolder
from proxy.http.bad_requests import server_logger
from proxy.http.front import FrontListener
from proxy.limits.ledger_file import LedgerFileError
from proxy.observe import access_log
from proxy.observe.metrics import MULTIPROC_ENV
from proxy.observe.worker_metrics import WORKER_ENV
from proxy.pdeathsig import parent_death_signal
from proxy.services import SERVICES

log = logging.getLogger(__name__)
FAST_PATH_ENV = "PROXY_FAST_PATH"


@dataclass(frozen=True)
class ServeOptions:
    config_path: Path
    host: str
    port: int
    workers: int = 1
    shutdown_timeout: float = 30.0
    # Let another proxy bind the same port, for a rolling restart on one host.
    reuse_port: bool = False
    # Serve without teams on a non-loopback host; checked again on every reload.
    allow_anonymous: bool = False


def run_worker(options: ServeOptions, reuse_port: bool | None = None) -> None:
    reuse_port = options.reuse_port if reuse_port is None else reuse_port
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(_worker(options, reuse_port))
    else:
        uvloop.run(_worker(options, reuse_port))


async def _worker(options: ServeOptions, reuse_port: bool) -> None:
    # Checked again here: a worker the supervisor starts again reads the file as it is now.
    exposure = Exposure(options.host, options.allow_anonymous)
    config = load_to_serve(options.config_path, exposure)
    holder = ConfigHolder(config, options.config_path, exposure)
    serving = await start_server(
        make_app(holder), options.host, options.port, reuse_port, options.shutdown_timeout
    )
    # Everything made so far lives as long as the worker: keep it out of the cyclic
    # collector's full passes, which otherwise walk it again and again under load
    # (profiled: 8 % of a worker's CPU went to collections).
    gc.freeze()
    # A young collection walks every container still alive, and under load that is every
    # call in flight: collecting after 10,000 allocations instead of 700 walks them far
    # less often (profiled under load: from 6 % of a worker's CPU to none seen in 8 s).
    # Refcounting still frees everything that is not a cycle at once.
    gc.set_threshold(10_000, 10, 10)
    for host, port in serving.addresses:
        log.info("proxy listening on http://%s:%s", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload)
    await stop.wait()
    log.info("shutting down: draining requests in flight (up to %ss)", options.shutdown_timeout)
    await serving.cleanup()
    access_log.flush()


class Serving:
    """The proxy on its port: aiohttp's runner, and the front's listener when the fast
    path is on. ``cleanup()`` stops it as aiohttp's runner would stop its sites: no new
    connections, calls in flight finish within the shutdown timeout, then the app's own
    cleanup (the accountant's last settlements, the engines)."""

    def __init__(
        self, runner: web.AppRunner, front: FrontListener | None, shutdown_timeout: float
    ) -> None:
        self.runner, self.front, self._shutdown_timeout = runner, front, shutdown_timeout

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self.front is not None:
            return self.front.addresses
        return [a[:2] for a in self.runner.addresses]

    async def cleanup(self) -> None:
        if self.front is not None:
            await self.front.close(self._shutdown_timeout)
        await self.runner.cleanup()


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    reuse_port: bool = False,
    shutdown_timeout: float = 30.0,
) -> Serving:
    """The proxy's app on a port: the lean front first (unless ``fast_path`` is off),
    aiohttp for the rest."""
    # handler_cancellation: a client that disconnects cancels its handler, which
    # closes the upstream call at once instead of when the next chunk fails to write.
    # keepalive_timeout also bounds how long a client may take to send a request head
    # (aiohttp closes a connection whose first request is not complete by then).
    # logger: aiohttp's own would log a malformed request's raw head (proxy/http/bad_requests.py).
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=app[SERVICES].config.current.server.keepalive_timeout,
        logger=server_logger(),
    )
    await runner.setup()
    if fast_path(app[SERVICES].config.current.server, os.environ):
        front = await FrontListener.open(runner, host, port, reuse_port)
        return Serving(runner, front, shutdown_timeout)
    # aiohttp's own site; its shutdown_timeout is the runner's, set above
    await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    return Serving(runner, None, shutdown_timeout)


def fast_path(settings: ServerSettings, env: Mapping[str, str]) -> bool:
    """Whether the lean front serves ordinary calls: ``server.fast_path``, unless the
    environment turns it off (``PROXY_FAST_PATH=0``, as AIOHTTP_NO_EXTENSIONS does for
    aiohttp's C parser), so that a whole deployment or test run can go without it."""
    return settings.fast_path and env.get(FAST_PATH_ENV, "1") not in ("0", "false", "off")


def supervise(options: ServeOptions) -> int:
    """Start N workers sharing one metrics directory; remove the directory at exit."""
    # A fresh directory each run: files left by an earlier run would be counted again.
    directory = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.environ[MULTIPROC_ENV] = directory  # inherited by the forked workers
    try:
        return _supervise(options, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _supervise(options: ServeOptions, metrics_dir: str) -> int:
    """Start N full workers on one port and pass signals on; restart a worker that dies."""
    context = multiprocessing.get_context("fork")
    stopping = False

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker_process,
            args=(options, parent_death_signal(signal.SIGTERM), index),
            daemon=False,
        )
        process.start()
        return process

    workers = [start(i) for i in range(options.workers)]

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for process in workers:
            if process.pid is not None and process.is_alive():
                _kill(process.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while not stopping:
        time.sleep(0.2)
        for i, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                # Its counters stay (they only go up); its live gauges must go.
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]
                log.error(
                    "worker pid %s exited with %s; starting another in 1s",
                    process.pid,
                    process.exitcode,
                )
                time.sleep(1.0)
                workers[i] = start(i)  # the same worker label as the one it replaces
    for process in workers:
        process.join()
    return 0


def _worker_process(options: ServeOptions, die_with_parent: Callable[[], None], index: int) -> None:
    # A parent killed with SIGKILL cannot stop its workers: the kernel sends them SIGTERM,
    # and they shut down as usual, their local engines included.
    die_with_parent()
    os.environ[WORKER_ENV] = str(index)  # its metrics' "worker" label
    try:
        run_worker(options, reuse_port=True)
    except ConfigError as exc:
        # The file changed since the start (the running workers refused it on reload):
        # this one does not serve it either; the supervisor tries again later.
        log.error("worker not started, %s refused: %s", options.config_path, "; ".join(exc.errors))
        raise SystemExit(2) from None
    except LedgerFileError as exc:  # broken since serve checked it: one line, not a trace
        log.error("worker not started: accounting.ledger_path: %s", exc)
        raise SystemExit(2) from None


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
