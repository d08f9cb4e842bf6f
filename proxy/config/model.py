"""The configuration as typed, frozen data. ``config/load.py`` builds it from routes.yaml."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from proxy.config.engine import EngineSpec
from proxy.config.telemetry import Telemetry

STRATEGIES = ("fallback", "round_robin", "weighted", "least_busy")
BALANCES = ("round_robin", "weighted", "least_busy", "affinity", "cache_aware")


def frozen_map(items: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
class Timeouts:
    """Seconds. A first token can take tens of seconds and a stream can last minutes."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per target, full-jitter backoff, and the call's overall time budget."""

    attempts: int = 2
    base_delay: float = 0.2
    max_delay: float = 5.0
    max_retry_after: float = 30.0
    budget: float = 120.0


@dataclass(frozen=True)
class CircuitPolicy:
    failures: int = 5
    cooldown: float = 5.0
    max_cooldown: float = 300.0


@dataclass(frozen=True)
class CacheAware:
    """The knobs of ``balance: cache_aware`` (routing/cache_aware.py has the algorithm)."""

    # Bytes of the serialized messages per prefix block: smaller finds shorter shared
    # prefixes and costs more hashing per call.
    block_bytes: int = 256
    # The memory cap of one replica's prefix index (counted as 256 bytes a block).
    index_memory: int = 4 * 2**20
    # What one call in flight costs in the score, against a whole prompt matched (1.0).
    load_weight: float = 0.1
    # Leave the best match for the least loaded replica when the best one has at least
    # this many more calls in flight, and more than this many times as many.
    imbalance_calls: int = 4
    imbalance_ratio: float = 1.5


@dataclass(frozen=True)
class Endpoint:
    """One replica of a provider: the API root its paths are joined to."""

    url: str
    weight: float = 1.0

    def join(self, path: str) -> str:
        """Join, never guess: W&B's ``/v1`` and Prime's ``/api/v1`` both stay as given."""
        return self.url.rstrip("/") + "/" + path.lstrip("/")


@dataclass(frozen=True)
class Price:
    """What a million tokens cost, in micro-dollars (USD times 10⁶): whole numbers, so that a
    call's cost is integer arithmetic and the ledger's sums are exact (limits/cost.py).
    ``cached_input`` is the price of prompt tokens the upstream reports as cached."""

    input: int
    output: int
    cached_input: int


@dataclass(frozen=True)
class Provider:
    name: str
    endpoints: tuple[Endpoint, ...]
    api_key: str | None = None
    # Set when routes.yaml names a key variable that is not in the environment: the
    # provider is then refused on use with an error naming the variable.
    missing_key_var: str | None = None
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    timeouts: Timeouts = Timeouts()
    retry: RetryPolicy = RetryPolicy()
    circuit: CircuitPolicy = CircuitPolicy()
    balance: str = "round_robin"
    cache_aware: CacheAware = CacheAware()
    # Ask for the usage chunk of streams the client did not ask it for (and strip it
    # again), so that streamed tokens are billed exactly. Off for upstreams that
    # reject stream_options.
    stream_usage: bool = True
    # A required provider must be reachable for /readyz to answer 200.
    required: bool = False
    # A local engine the proxy runs itself; its base_url is then a template whose port
    # is filled in per call from the replica that serves it (see proxy.engines.lease).
    engine: EngineSpec | None = None
    # The default price of its targets; a target's own ``price`` wins.
    price: Price | None = None

    @property
    def base_url(self) -> str:
        return self.endpoints[0].url


@dataclass(frozen=True)
class Target:
    provider: str
    model: str
    weight: float = 1.0
    # What a call it serves costs: its own price, else its provider's (config/load.py);
    # None: it costs 0, and ``python -m proxy check`` warns.
    price: Price | None = None


# The two names of a call's output cap: ``max_tokens``, and OpenAI's newer
# ``max_completion_tokens`` (chat only; OpenAI's reasoning models take no other).
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class OutputCap:
    """``models.ID.max_tokens``: the most a call may ask the model to generate."""

    # Injected into a call that names no cap (neither field, or both null), and so what
    # admission reserves for it. Without one set, the limit is the default.
    default: int
    # A call asking for more (in either field) is refused; None: no limit.
    limit: int | None = None
    # The name the default is injected under in chat calls; /v1/completions has only
    # max_tokens.
    field: str = "max_tokens"


@dataclass(frozen=True)
class Model:
    id: str
    targets: tuple[Target, ...]
    strategy: str = "fallback"
    owned_by: str = "system"
    # Only the retry fields the model sets itself; they win over its providers' policy.
    retry_overrides: Mapping[str, Any] = field(default_factory=frozen_map)
    budget: float = RetryPolicy.budget
    max_tokens: OutputCap | None = None
    # A local engine's target is passed over for the next one when its queue's estimated
    # wait exceeds this many seconds (a time-to-first-token budget); None: always queue.
    spill_after: float | None = None

    def retry_for(self, provider: Provider) -> RetryPolicy:
        if not self.retry_overrides:
            return provider.retry
        return replace(provider.retry, **self.retry_overrides)


@dataclass(frozen=True)
class ServerSettings:
    max_body_bytes: int = 16 * 1024 * 1024
    reload_interval: float = 1.0
    # How long a client may take to send a request body. The request head has the
    # keep-alive time (read once at start, like the port).
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    # The most an upstream's non-streamed answer may hold (decoded): it is read whole.
    max_answer_bytes: int = 64 * 1024 * 1024
    # The lean front (proxy/http/front.py) serves ordinary calls ahead of aiohttp's server,
    # as aiohttp's C parser runs ahead of its Python one; false (or PROXY_FAST_PATH=0)
    # leaves every request to aiohttp. Read once at start, like the port.
    fast_path: bool = True


LIMIT_KINDS = ("requests_per_minute", "tokens_per_minute", "concurrent", "tokens_per_day")
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Limits:
    """Per team, or per team and model. None: no such limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None
    tokens_per_day: int | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, kind) is not None for kind in LIMIT_KINDS)


BUDGET_KINDS = ("daily_usd", "monthly_usd")  # UTC day, UTC calendar month


@dataclass(frozen=True)
class Budget:
    """Per team, or per team and model: the most its calls may cost in a UTC day or month,
    in micro-dollars (USD times 10⁶, as prices and the ledger). None: no such budget."""

    daily_usd: int | None = None
    monthly_usd: int | None = None

    def __bool__(self) -> bool:
        return self.daily_usd is not None or self.monthly_usd is not None


@dataclass(frozen=True)
class TeamKey:
    """One key of a team, by the name routes.yaml gives it; the key itself is never stored."""

    team: str
    name: str  # what the access log shows; "sha256:<12 hex>" for a bare hash
    hash: str  # "sha256:<hex>" of the key
    expires: float | None = None  # Unix time from which it is refused; None: never


@dataclass(frozen=True)
class Team:
    name: str
    keys: tuple[TeamKey, ...] = ()
    # The model ids its ``models`` patterns matched when the file was read; None: every model.
    models: frozenset[str] | None = None
    limits: Limits = Limits()
    model_limits: Mapping[str, Limits] = field(default_factory=frozen_map)
    budget: Budget = Budget()
    model_budgets: Mapping[str, Budget] = field(default_factory=frozen_map)
    # provider name → headers sent to that provider for this team's calls
    headers: Mapping[str, Mapping[str, str]] = field(default_factory=frozen_map)
    # the provider-scoping headers (OpenAI-Project, …) its clients may set, lower-case
    client_headers: frozenset[str] = frozenset()
    # Its share of a busy local engine against other teams' (engines/fair_queue.py).
    weight: float = 1.0


@dataclass(frozen=True)
class RedisSettings:
    # Seed nodes of one Redis, a Cluster, or one redis+sentinel:// URL (proxy/redis/
    # router.py); none: limits and ledger live in this process.
    urls: tuple[str, ...] = ()
    on_error: str = "fail_open"  # or fail_closed
    # A concurrency slot is a lease: a process that dies leaks it for this long at most.
    lease_ttl: float = 60.0
    timeout: float = 0.5
    # A settlement counts as written once this many replicas confirm it (WAIT); until
    # then it stays queued and is sent again. 0: once the primary has it.
    ledger_replicas: int = 0


@dataclass(frozen=True)
class Accounting:
    # Reserved at admission for a call that does not say max_tokens, when its model
    # sets no max_tokens default (models.ID.max_tokens).
    default_max_tokens: int = 1024
    # Without Redis: the SQLite file the ledger is kept in (limits/ledger_file.py),
    # absolute once loaded; None: in memory only, lost on restart.
    ledger_path: str | None = None
    ledger_interval: float = 1.0  # seconds between its writes: what a SIGKILL may lose


@dataclass(frozen=True)
class Config:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    teams: Mapping[str, Team] = field(default_factory=frozen_map)
    accounting: Accounting = Accounting()
    # "sha256:<hex>" → the team's key, built by the loader for one lookup per call.
    key_index: Mapping[str, TeamKey] = field(default_factory=frozen_map)
    admin_key: str = ""
    telemetry: Telemetry | None = None  # OpenTelemetry traces; None: off
    # Warnings that do not make the file invalid (a provider key variable unset).
    warnings: tuple[str, ...] = ()
