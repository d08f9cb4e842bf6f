"""What each worker says about itself: the build, when its config last loaded, and its
process's CPU, memory, file descriptors and start time, each with a ``worker`` label.

prometheus-client's own ``process_*`` collector reads only the scraped process, and is
not written to the multiprocess files: under ``--workers N`` a scrape would show one
worker's figures, a different one each time. These gauges are written by every worker
(sampled once a second and before its own scrapes), so one scrape shows every worker.
"""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

WORKER_ENV = "LLM_PROXY_WORKER"  # the supervisor's index of this worker, "0" alone
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def package_version() -> str:
    try:
        return version("llm-routing-proxy")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout not installed
        return "unknown"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str, worker: str) -> None:
        self.worker = worker
        p, labels = prefix, ["worker"]

        def gauge(name: str, text: str, extra: tuple[str, ...] = ()) -> Gauge:
            # livemax: a worker that died leaves no series behind (its pid's file is
            # marked dead by the supervisor), and each worker has a label of its own.
            return Gauge(
                p + name, text, [*labels, *extra], registry=registry, multiprocess_mode="livemax"
            )

        self.build_info = gauge("build_info", "1, labelled with the version.", ("version",))
        self.reload_ok = gauge(
            "config_last_reload_success_timestamp_seconds",
            "When the running config was loaded (at start or on a reload), Unix time.",
        )
        self.cpu = gauge("process_cpu_seconds", "CPU time (user + system) of the worker.")
        self.rss = gauge("process_resident_memory_bytes", "Resident memory of the worker.")
        self.fds = gauge("process_open_fds", "Open file descriptors of the worker.")
        self.started = gauge("process_start_time_seconds", "When the worker started, Unix time.")
        self.build_info.labels(worker, package_version()).set(1)
        self.config_loaded()
        self.started.labels(worker).set(_start_time())
        self.sample()

    def config_loaded(self) -> None:
        self.reload_ok.labels(self.worker).set(time.time())

    def sample(self) -> None:
        """The process's figures now, from /proc (Linux); elsewhere, CPU time only."""
        times = os.times()
        self.cpu.labels(self.worker).set(times.user + times.system)
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.rss.labels(self.worker).set(pages * _PAGE)
            self.fds.labels(self.worker).set(len(os.listdir("/proc/self/fd")))
        except OSError:  # pragma: no cover - not Linux
            pass


def _start_time() -> float:
    """Boot time plus the process's start in clock ticks since boot (/proc), else now."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration):  # pragma: no cover - not Linux
        return time.time()
    return boot + int(stat[19]) / _TICKS
