"""What the engines tell the metrics exporter: their own Prometheus metrics, and their state.

llama.cpp (``--metrics``) and vLLM export ``/metrics``. ``engine_metrics_text`` fetches
it from every ready replica with a ``metrics_path`` (of every worker: engines/
worker_view.py) and returns one exposition text in which each family appears once and
each sample carries ``engine="<provider>"``, ``replica="<n>"`` and ``worker="<i>"``
labels, ready to be appended to the proxy's own ``GET /metrics`` output. A replica
that does not answer in time is left out of that scrape (and logged at debug), never
failing the scrape.

``engine_status`` is the proxy's own view of each replica (state, calls in flight,
starts, crashes, restarts, idle unloads) as plain rows, for gauges and counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from proxy.engines.registry import Engines

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 2.0


@dataclass(frozen=True)
class ReplicaStatus:
    engine: str
    replica: int
    state: str  # stopped, starting, ready, stopping, backoff
    in_flight: int
    starts: int  # counters since the proxy started
    crashes: int
    restarts: int
    unloads: int  # the engine's idle unloads (the same on each of its replicas)
    last_start_seconds: float | None  # spawn → ready, the last time


def engine_status(engines: Engines) -> list[ReplicaStatus]:
    return [
        ReplicaStatus(
            engine=s.name,
            replica=r.index,
            state=r.state,
            in_flight=r.in_flight,
            starts=r.stats.starts,
            crashes=r.stats.crashes,
            restarts=r.stats.restarts,
            unloads=s.unloads,
            last_start_seconds=r.stats.last_start_seconds,
        )
        for s in engines.supervisors.values()
        for r in s.replicas
    ]


@dataclass(frozen=True)
class MetricsSource:
    engine: str
    replica: int
    url: str  # the replica's /metrics


def metrics_sources(engines: Engines) -> list[MetricsSource]:
    """Where this process's ready replicas export their metrics."""
    return [
        MetricsSource(s.name, r.index, r.root_url + s.spec.metrics_path)
        for s in engines.supervisors.values()
        if s.spec.metrics_path is not None
        for r in s.replicas
        if r.state == "ready"
    ]


async def engine_metrics_text(
    session: aiohttp.ClientSession, sources: list[tuple[str, MetricsSource]]
) -> str:
    """Each (worker, source)'s metrics, fetched now, merged and labelled."""
    texts = await asyncio.gather(*(_fetch(session, source) for _, source in sources))
    merged: dict[str, Metric] = {}
    for (worker, source), text in zip(sources, texts, strict=True):
        if text:
            labels = {"engine": source.engine, "replica": str(source.replica), "worker": worker}
            _merge(merged, text, labels)
    if not merged:
        return ""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry).decode()


async def _fetch(session: aiohttp.ClientSession, source: MetricsSource) -> str:
    label = f"{source.engine}#{source.replica}"
    try:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with session.get(source.url, timeout=timeout) as response:
            if response.status != 200:
                log.debug("engine %s metrics: HTTP %s", label, response.status)
                return ""
            return await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("engine %s metrics: %r", label, exc)
        return ""


def _merge(merged: dict[str, Metric], text: str, labels: dict[str, str]) -> None:
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        log.warning("engine %s: unparsable /metrics: %s", labels["engine"], exc)
        return
    for family in families:
        into = merged.setdefault(
            family.name, Metric(family.name, family.documentation, family.type, family.unit)
        )
        into.samples.extend(
            Sample(s.name, {**s.labels, **labels}, s.value, s.timestamp, s.exemplar)
            for s in family.samples
        )


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def engine_status_text(rows: list[tuple[str, ReplicaStatus]]) -> str:
    """The proxy's view of its engines as Prometheus text: up, in flight, starts,
    crashes, restarts and idle unloads per (worker, engine, replica)."""
    if not rows:
        return ""
    labels = ["engine", "replica", "worker"]
    up = GaugeMetricFamily(
        "llm_proxy_engine_up", "1 if the replica is ready, else 0.", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "llm_proxy_engine_in_flight", "Calls holding the replica.", labels=labels
    )
    counters = {
        name: CounterMetricFamily(f"llm_proxy_engine_{name}", text, labels=labels)
        for name, text in (
            ("starts", "Replica starts."),
            ("crashes", "Replica deaths."),
            ("restarts", "Restarts after a death or a failed start."),
            ("unloads", "Idle unloads of the engine."),
        )
    }
    for worker, row in rows:
        values = [row.engine, str(row.replica), worker]
        up.add_metric(values, 1.0 if row.state == "ready" else 0.0)
        in_flight.add_metric(values, row.in_flight)
        for name, family in counters.items():
            family.add_metric(values, getattr(row, name))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([up, in_flight, *counters.values()]))
    return generate_latest(registry).decode()
