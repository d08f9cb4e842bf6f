"""Every Prometheus series the proxy exports, and the small functions that record them.

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
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics import MetricWrapperBase

from proxy.observe.tally import TalliedCount, TalliedHistogram, Tally
from proxy.observe.worker_metrics import WORKER_ENV, WorkerMetrics

PREFIX = "llm_proxy_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNKNOWN_MODEL = "unknown"
NO_PROVIDER = "none"

AttemptOutcome = Literal["ok", "retried", "failed", "circuit_open", "spilled"]
TokenKind = Literal["prompt", "completion"]
TokenSource = Literal["reported", "estimated"]
CircuitState = Literal["closed", "half_open", "open"]
_CIRCUIT_VALUES: dict[CircuitState, float] = {"closed": 0.0, "half_open": 1.0, "open": 2.0}

# LLM calls run from milliseconds (a cached embedding) to many minutes (a long stream).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)
# The proxy's own work should be well under a millisecond; the buckets show when not.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
)  # fmt: skip
CHUNK_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A local engine's queue: nothing for most calls, seconds to a minute when it is full.
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

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


class Metrics:
    def __init__(self, multiproc_dir: str | None = None, worker: str = "0") -> None:
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry()
        self.worker = WorkerMetrics(self.registry, PREFIX, worker)
        self._define_calls(self.registry)
        self._define_upstreams(self.registry)
        self._define_teams(self.registry)
        self._define_operations(self.registry)
        self._define_engine_queues(self.registry)
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

    def _define_calls(self, r: CollectorRegistry) -> None:
        p = PREFIX
        self.requests = Counter(
            p + "requests",
            "Proxied API calls by team, model, provider and HTTP status.",
            ["team", "model", "provider", "status"],
            registry=r,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Whole proxied call, streams to their end.",
            ["team", "model", "provider"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Streams: from the request to the first chunk relayed to the client.",
            ["model", "provider"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            p + "overhead_seconds",
            "Time of a call not spent waiting on the upstream or the client.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.chunk_gap = Histogram(
            p + "stream_chunk_gap_seconds",
            "Time between two chunks of one upstream stream.",
            ["provider"],
            buckets=CHUNK_GAP_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            p + "requests_in_flight",
            "Proxied calls being handled now.",
            registry=r,
            multiprocess_mode="livesum",
        )

    def _define_upstreams(self, r: CollectorRegistry) -> None:
        p = PREFIX
        self.attempts = Counter(
            p + "upstream_attempts",
            "Upstream attempts by outcome (ok, retried, failed, circuit_open).",
            ["provider", "outcome"],
            registry=r,
        )
        self.endpoint_up = Gauge(
            p + "endpoint_up",
            "1 if the last health probe reached the endpoint, else 0.",
            ["provider", "endpoint"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.prefix = Counter(
            p + "prefix_blocks",
            "balance: cache_aware's prompt blocks by whether the chosen replica was estimated "
            "to hold them (hit) or not (miss): hit / (hit + miss) is the estimated prefix "
            "hit ratio.",
            ["provider", "result"],
            registry=r,
        )
        self.circuit = Gauge(
            p + "circuit_state",
            "Circuit breaker per endpoint: 0 closed, 1 half-open, 2 open.",
            ["provider", "endpoint"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def _define_teams(self, r: CollectorRegistry) -> None:
        p = PREFIX
        self.tokens = Counter(
            p + "tokens",
            "Tokens by team, model, kind (prompt, completion) and source "
            "(reported by the upstream, estimated by the proxy).",
            ["team", "model", "kind", "source"],
            registry=r,
        )
        self.cost = Counter(
            p + "cost_usd",
            "What calls cost at the served targets' prices, in USD, by team, model "
            "(the routes.yaml id) and provider.",
            ["team", "model", "provider"],
            registry=r,
        )
        # Set from each admission's view of the shared store: every replica sees the same
        # figures, the most recent wins.
        self.budget_limit, self.budget_used = (
            Gauge(p + name, text, ["team", "model", "period"], registry=r,
                  multiprocess_mode="livemostrecent")
            for name, text in (
                ("budget_usd", "A team's budget (model '*': the whole team's) per period "
                 "(daily, monthly), in USD."),
                ("budget_used_usd", "What a team's budget has spent, and holds for calls in "
                 "flight, this period, as the last admission saw it, in USD."),
            )
        )  # fmt: skip
        self.rate_limited = Counter(
            p + "rate_limit_rejections",
            "Calls refused with 429 by a team's limit.",
            ["team", "limit"],
            registry=r,
        )

    def _define_operations(self, r: CollectorRegistry) -> None:
        p = PREFIX
        self.reloads = Counter(
            p + "config_reloads",
            "routes.yaml reloads by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.redis_errors = Counter(
            p + "redis_errors",
            "Redis calls that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.ledger_file_writes = Counter(
            p + "ledger_file_writes",
            "Writes of the embedded ledger to its SQLite file, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.redis_latency = Histogram(
            p + "redis_latency_seconds",
            "Redis round trips, by operation.",
            ["operation"],
            buckets=REDIS_BUCKETS,
            registry=r,
        )

    def _define_engine_queues(self, r: CollectorRegistry) -> None:
        p = PREFIX
        self.queue_depth = Gauge(
            p + "engine_queue_depth",
            "Calls waiting for a slot of a local engine, by engine and team.",
            ["engine", "team"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            p + "engine_queue_wait_seconds",
            "How long calls a local engine admitted waited for a slot (0: one was free).",
            ["engine", "team"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.queue_refused = Counter(
            p + "engine_queue_rejections",
            "Calls a local engine's queue refused with 429 (full, timeout) or that left it "
            "(cancelled: the client went away while waiting).",
            ["engine", "team", "reason"],
            registry=r,
        )

    # -- recording functions for the features built elsewhere (teams, resilience, engines)

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
