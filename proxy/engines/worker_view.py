"""Every worker's engines in one scrape.

Under ``--workers N`` each worker runs its own engines, and a scrape reaches one worker:
its engines alone would show, under the same labels as the others', so their counters
seemed to run backwards from one scrape to the next. Each worker therefore writes, once
a second, what it knows of its engines (each replica's state and counters, and where
its ``/metrics`` answers when ready) to a file of its own in the metrics directory,
``engines-<worker>.json``. A scrape of any worker takes its own engines as they are and
the other live workers' from their files (at most a second old), fetches every listed
replica's metrics itself, and labels every sample with its ``worker``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from proxy.engines.metrics_export import (
    MetricsSource,
    ReplicaStatus,
    engine_metrics_text,
    engine_status,
    engine_status_text,
    metrics_sources,
)
from proxy.engines.registry import Engines

STALE_AFTER = 10.0  # seconds: a file not rewritten for this long is a worker gone


@dataclass(frozen=True)
class WorkerEngines:
    worker: str
    pid: int
    status: tuple[ReplicaStatus, ...]
    sources: tuple[MetricsSource, ...]


def own_view(engines: Engines, worker: str) -> WorkerEngines:
    status, sources = tuple(engine_status(engines)), tuple(metrics_sources(engines))
    return WorkerEngines(worker, os.getpid(), status, sources)


def write_view(directory: str, view: WorkerEngines) -> None:
    path = Path(directory) / f"engines-{view.worker}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(view)))
    partial.replace(path)  # a reader sees the whole file or the last one


def all_views(directory: str | None, own: WorkerEngines, now: float) -> list[WorkerEngines]:
    """This worker's view and every other live worker's, by worker."""
    views = [own]
    for path in sorted(Path(directory).glob("engines-*.json")) if directory else []:
        try:
            stale = now - path.stat().st_mtime > STALE_AFTER
            view = _parse(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or from another version: skipped this time
        if view.worker != own.worker and not stale and _alive(view.pid):
            views.append(view)
    return sorted(views, key=lambda v: v.worker)


def _parse(raw: dict[str, object]) -> WorkerEngines:
    status = raw["status"]
    sources = raw["sources"]
    assert isinstance(status, list) and isinstance(sources, list)
    return WorkerEngines(
        str(raw["worker"]),
        int(str(raw["pid"])),
        tuple(ReplicaStatus(**row) for row in status),
        tuple(MetricsSource(**source) for source in sources),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process with that pid
        return True
    return True


async def engines_text(engines: Engines, directory: str | None, worker: str) -> str:
    """Every live worker's engines: their state, then their own metrics, labelled."""
    views = all_views(directory, own_view(engines, worker), time.time())
    rows = [(v.worker, row) for v in views for row in v.status]
    sources = [(v.worker, source) for v in views for source in v.sources]
    return engine_status_text(rows) + await engine_metrics_text(engines.session, sources)
