"""What one call did, filled in as it travels and written to the access log at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proxy.usage import Usage


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
    model: str | None = None
    provider: str | None = None
    endpoint: str | None = None
    status: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    first_byte: float | None = None
    stream_error: str | None = None
    team: str | None = None
    # What the answer said it used, or, without that, what its body suggests.
    usage: Usage | None = None
    completion_estimate: int | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
