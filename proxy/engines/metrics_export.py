"""What the engines tell the metrics exporter: their own Prometheus metrics, and their state.

llama.cpp (``--metrics``) and vLLM export ``/metrics``. ``engine_metrics_text`` fetches
it from every ready replica of every engine with a ``metrics_path`` and returns one
exposition text in which each family appears once and each sample carries
``engine="<provider>"`` and ``replica="<n>"`` labels, ready to be appended to the
proxy's own ``GET /metrics`` output. A replica that does not answer in time is left
out of that scrape (and logged at debug), never failing the scrape.

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
from proxy.engines.replica import Replica

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


async def engine_metrics_text(engines: Engines) -> str:
    replicas = [
        r
        for s in engines.supervisors.values()
        if s.spec.metrics_path is not None
        for r in s.replicas
        if r.state == "ready"
    ]
    texts = await asyncio.gather(*(_fetch(engines.session, r) for r in replicas))
    merged: dict[str, Metric] = {}
    for replica, text in zip(replicas, texts, strict=True):
        if text:
            _merge(merged, text, {"engine": replica.engine, "replica": str(replica.index)})
    if not merged:
        return ""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry).decode()


async def _fetch(session: aiohttp.ClientSession, replica: Replica) -> str:
    url = replica.root_url + (replica.spec.metrics_path or "/metrics")
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)) as response:
            if response.status != 200:
                log.debug("engine %s metrics: HTTP %s", replica.label, response.status)
                return ""
            return await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("engine %s metrics: %r", replica.label, exc)
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


def engine_status_text(engines: Engines) -> str:
    """The proxy's view of its engines as Prometheus text: up, in flight, starts,
    crashes, restarts and idle unloads per replica."""
    rows = engine_status(engines)
    if not rows:
        return ""
    labels = ["engine", "replica"]
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
    for row in rows:
        values = [row.engine, str(row.replica)]
        up.add_metric(values, 1.0 if row.state == "ready" else 0.0)
        in_flight.add_metric(values, row.in_flight)
        for name, family in counters.items():
            family.add_metric(values, getattr(row, name))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([up, in_flight, *counters.values()]))
    return generate_latest(registry).decode()
