"""What one call did, filled in as it travels; the access log and the metrics read it at
the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from proxy.config.model import ANONYMOUS, Price
from proxy.limits.usage import Usage

if TYPE_CHECKING:
    from proxy.observe.spans import CallTrace


@dataclass(frozen=True)
class Attempt:
    """One try of one endpoint. ``outcome``: ok, retried, failed or circuit_open."""

    provider: str
    endpoint: str
    outcome: str
    detail: str


@dataclass
class CallRecord:
    """Mutable on purpose: one per request, owned by its handler, appended to as it goes."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    team: str = ANONYMOUS
    # The name routes.yaml gives the caller's key (never the key); None: no key named.
    key: str | None = None
    api: str | None = None  # the proxied API (chat/completions …); None for other paths
    model: str | None = None  # what the client asked for, as sent
    route: str | None = None  # the routes.yaml model id, once routed: a safe metric label
    provider: str | None = None
    endpoint: str | None = None  # the upstream endpoint (replica) of the last attempt
    status: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    first_byte: float | None = None
    stream_error: str | None = None
    # What the answer said it used, or, without that, what its body suggests.
    usage: Usage | None = None
    completion_estimate: int | None = None
    billed: Usage | None = None  # what settlement booked (reported or estimated)
    price: Price | None = None  # the price of the target of the last attempt
    cost: int = 0  # micro-dollars: the answer's, and failed attempts' that reported usage
    rate_headers: dict[str, str] = field(default_factory=dict)
    # Seconds spent awaiting the upstream or the client: the rest of the call is the
    # proxy's own overhead.
    waited: float = 0.0
    trace: CallTrace | None = None  # its OpenTelemetry span, with telemetry on (call/traced.py)

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()

    def waiting(self) -> _Waiting:
        """``with record.waiting():`` around awaiting the upstream (or a backoff sleep)."""
        return _Waiting(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class _Waiting:
    """A plain class, not @contextmanager: it runs several times per call, on the hot path."""

    __slots__ = ("record", "start")

    def __init__(self, record: CallRecord) -> None:
        self.record = record
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.record.waited += time.perf_counter() - self.start
