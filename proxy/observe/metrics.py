"""How every Prometheus series the proxy exports is recorded (they are declared in
observe/metric_families.py), and the small functions that record them.

One ``Metrics`` per app, with its own ``CollectorRegistry`` (never the library's
global one), so in-process tests can run many proxies side by side. Label values come
only from routes.yaml (model ids, provider names, team names) or from small fixed sets
(status codes, outcomes, kinds), so the number of series stays bounded whatever the
clients send. A model id that is not in routes.yaml is counted as ``unknown``.

Under ``--workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before forking;
each worker then writes its values to files there and a scrape of any worker merges
all of them (prometheus-client's multiprocess mode), so one scrape sees every worker.

Hot path: the labelled children used on every call are cached in plain dicts, and
their updates are gathered in a tally (observe/tally.py) that adds them to the values
every 50 ms and before a scrape, so a request costs a handful of dict lookups and
additions.

What the features built elsewhere call (all labels from routes.yaml):

- a call's team: set ``record.team`` (a team name) after authentication;
- each attempt: an entry in ``record.attempts``, counted here when the call finishes;
  a backoff sleep goes inside ``with record.waiting():`` so it is not counted as
  overhead;
- ``rate_limit_rejected``, ``redis_call`` / ``redis_timer``, ``circuit_changed``,
  ``endpoint_health`` and ``add_tokens(..., "estimated")`` below.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Generic, Literal, TypeVar
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics import MetricWrapperBase

from proxy.observe.metric_families import PREFIX, MetricFamilies
from proxy.observe.tally import TalliedCount, TalliedHistogram, Tally
from proxy.observe.worker_metrics import WORKER_ENV, WorkerMetrics

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNKNOWN_MODEL = "unknown"
NO_PROVIDER = "none"

AttemptOutcome = Literal["ok", "retried", "failed", "circuit_open", "spilled"]
TokenKind = Literal["prompt", "completion"]
TokenSource = Literal["reported", "estimated"]
CircuitState = Literal["closed", "half_open", "open"]
_CIRCUIT_VALUES: dict[CircuitState, float] = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


M = TypeVar("M", bound=MetricWrapperBase)
W = TypeVar("W", TalliedCount, TalliedHistogram)


class RedisTimer:
    """A plain class, not @contextmanager: twice per call when Redis keeps the limits."""

    __slots__ = ("metrics", "operation", "start")

    def __init__(self, metrics: Metrics, operation: str) -> None:
        self.metrics, self.operation, self.start = metrics, operation, 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
        # Not CancelledError: a client going away is not a Redis error.
        ok = kind is None or not issubclass(kind, Exception)
        self.metrics.redis_call(self.operation, time.perf_counter() - self.start, ok=ok)


class _Children(Generic[M, W]):
    """Cache of a family's labelled children, each updated through the tally: one dict
    lookup instead of ``labels()``."""

    def __init__(self, family: M, tallied: Callable[[M, Tally], W], tally: Tally) -> None:
        self._labels: Callable[..., M] = family.labels
        self._tallied: Callable[[M, Tally], W] = tallied
        self._tally = tally
        self._cache: dict[tuple[str, ...], W] = {}

    def get(self, *label_values: str) -> W:
        child = self._cache.get(label_values)
        if child is None:
            child = self._cache[label_values] = self._tallied(
                self._labels(*label_values), self._tally
            )
        return child


class Metrics(MetricFamilies):
    """The families (observe/metric_families.py) and how each is recorded."""

    def __init__(self, multiproc_dir: str | None = None, worker: str = "0") -> None:
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry()
        self.worker = WorkerMetrics(self.registry, PREFIX, worker)
        super().__init__(self.registry)
        # What every call updates, through the tally (observe/tally.py), children cached.
        self.tally = tally = Tally()
        self.c_requests = _Children(self.requests, TalliedCount, tally)
        self.c_duration = _Children(self.duration, TalliedHistogram, tally)
        self.c_ttft = _Children(self.ttft, TalliedHistogram, tally)
        self.c_chunk_gap = _Children(self.chunk_gap, TalliedHistogram, tally)
        self.c_attempts = _Children(self.attempts, TalliedCount, tally)
        self.c_tokens = _Children(self.tokens, TalliedCount, tally)
        self.c_cost = _Children(self.cost, TalliedCount, tally)
        self.c_prefix = _Children(self.prefix, TalliedCount, tally)
        self.c_redis_latency = _Children(self.redis_latency, TalliedHistogram, tally)
        self.c_overhead = TalliedHistogram(self.overhead, tally)
        self.c_in_flight = TalliedCount(self.in_flight, tally)

    @classmethod
    def from_env(cls) -> Metrics:
        directory = os.environ.get(MULTIPROC_ENV) or None
        if directory is not None:
            # prometheus-client chooses where values live when it is first imported;
            # the supervisor sets the variable later (just before forking), so the
            # worker asks it to choose again. Idempotent.
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        return cls(directory, os.environ.get(WORKER_ENV, "0"))

    def rate_limit_rejected(self, team: str, limit: str) -> None:
        """A call refused by ``limit`` (requests_per_minute, tokens_per_minute, concurrent)."""
        self.rate_limited.labels(team, limit).inc()

    def budget(self, team: str, model: str, period: str, limit: int, used: int) -> None:
        """A budget as an admission saw it, both figures in micro-dollars."""
        self.budget_limit.labels(team, model, period).set(limit / 1_000_000)
        self.budget_used.labels(team, model, period).set(used / 1_000_000)

    def engine_queued(self, engine: str, team: str, change: int) -> None:
        """A call joined (+1) or left (-1) an engine's queue."""
        self.queue_depth.labels(engine, team).inc(change)

    def engine_waited(self, engine: str, team: str, seconds: float, outcome: str) -> None:
        """A call's queueing ended: admitted after ``seconds``, or refused or cancelled."""
        if outcome == "admitted":
            self.queue_wait.labels(engine, team).observe(seconds)
        else:
            self.queue_refused.labels(engine, team, outcome).inc()

    def redis_call(self, operation: str, seconds: float, ok: bool = True) -> None:
        """One Redis round trip (operation: admit, settle, ledger …), failed or not."""
        self.c_redis_latency.get(operation).observe(seconds)
        if not ok:
            self.redis_errors.labels(operation).inc()

    def ledger_file_written(self, ok: bool) -> None:
        """One write of the ledger file (limits/ledger_keeper.py); a failed one is retried."""
        self.ledger_file_writes.labels("ok" if ok else "error").inc()

    def redis_timer(self, operation: str) -> RedisTimer:
        """``with metrics.redis_timer("admit"): await script(...)``: latency, and errors."""
        return RedisTimer(self, operation)

    def circuit_changed(self, provider: str, endpoint: str, state: CircuitState) -> None:
        """A breaker changed state; ``endpoint`` is a label from ``endpoint_label()``."""
        self.circuit.labels(provider, endpoint).set(_CIRCUIT_VALUES[state])

    def endpoint_health(self, provider: str, endpoint: str, healthy: bool) -> None:
        """The result of a health probe of one endpoint of a provider."""
        self.endpoint_up.labels(provider, endpoint).set(1.0 if healthy else 0.0)

    def attempt(self, provider: str, outcome: AttemptOutcome) -> None:
        self.c_attempts.get(provider, outcome).inc()

    def prefix_blocks(self, provider: str, hit: int, blocks: int) -> None:
        """A cache_aware choice: ``hit`` of the call's ``blocks`` estimated cached there."""
        self.c_prefix.get(provider, "hit").inc(hit)
        self.c_prefix.get(provider, "miss").inc(blocks - hit)

    def add_tokens(
        self, team: str, model: str, prompt: int, completion: int, source: TokenSource
    ) -> None:
        if prompt:
            self.c_tokens.get(team, model, "prompt", source).inc(prompt)
        if completion:
            self.c_tokens.get(team, model, "completion", source).inc(completion)

    def config_reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "error").inc()
        if ok:
            self.worker.config_loaded()

    # -- exposition

    def flush(self) -> None:
        """Add what the tally gathered to the exported values (in the loop's thread)."""
        self.tally.flush()

    def scrape(self) -> bytes:
        """Everything, this process's updates to this instant included."""
        self.flush()
        self.worker.sample()
        return self.render()

    def render(self) -> bytes:
        """Everything as the values hold it now (safe off the loop's thread)."""
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        # Every worker's files, merged: one scrape of any worker is the whole server.
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    def series_names(self) -> frozenset[str]:
        """Every series name this proxy can export, sampled or not (for the dashboard test)."""
        names: set[str] = set()
        for family in self.registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        return frozenset(names)


_SUFFIXES: dict[str, Sequence[str]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


@lru_cache(maxsize=1024)  # endpoints come from routes.yaml: few, and asked for every call
def endpoint_label(url: str) -> str:
    """An endpoint's URL as a label: scheme, host, port and path, never userinfo or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"
