"""The declarations of every series the proxy exports: names, help texts, labels and
buckets, in the groups the dashboard shows them. observe/metrics.py's ``Metrics``
records them; docs/metrics.md describes them for an operator."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "llm_proxy_"

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


class MetricFamilies:
    """The families, declared on one registry (never the library's global one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._define_calls(registry)
        self._define_upstreams(registry)
        self._define_teams(registry)
        self._define_operations(registry)
        self._define_engine_queues(registry)

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
