"""Circuit breaking per endpoint: take a failing replica out, probe it before trusting it.

closed ──N consecutive failures──▶ open (cool-down) ──cool-down over──▶ half-open
   ▲                                  ▲                                   │ one probe
   └────────── probe succeeds ────────┼───────── probe fails ◀────────────┘
                                      (cool-down doubles, up to max_cooldown)

A new failure can only push ``open_until`` later, never earlier. While a probe is
out, other calls treat the endpoint as open; a probe that never reports back (its
process died) expires after ``probe_lease`` seconds so that another can go.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from proxy.config import CircuitPolicy


class Admission(Enum):
    CLOSED = "closed"
    PROBE = "probe"
    OPEN = "open"


@dataclass
class _State:
    """Mutable per-endpoint counters, owned by one CircuitBreakers."""

    failures: int = 0
    opened: int = 0  # consecutive openings: the cool-down grows with it
    open_until: float = 0.0
    probe_until: float = 0.0


class CircuitBreakers:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._states: dict[str, _State] = {}

    def admit(self, key: str, probe_lease: float) -> Admission:
        state = self._states.get(key)
        if state is None or state.opened == 0:
            return Admission.CLOSED
        now = self._clock()
        if now < state.open_until or now < state.probe_until:
            return Admission.OPEN
        state.probe_until = now + probe_lease
        return Admission.PROBE

    def succeeded(self, key: str) -> None:
        if key in self._states:
            del self._states[key]

    def failed(self, key: str, policy: CircuitPolicy) -> None:
        state = self._states.setdefault(key, _State())
        state.failures += 1
        now = self._clock()
        if state.opened and now < state.open_until:
            # A call that was already in flight: it extends the cool-down, but it is
            # not a failed probe, so the cool-down does not grow.
            state.open_until = max(state.open_until, now + _cooldown(policy, state.opened))
        elif state.opened or state.failures >= policy.failures:
            state.opened += 1  # opening, or a failed probe: the cool-down grows
            state.open_until = max(state.open_until, now + _cooldown(policy, state.opened))
            state.probe_until = 0.0

    def released(self, key: str) -> None:
        """A call that neither succeeded nor failed (e.g. a 429): let the next one probe."""
        state = self._states.get(key)
        if state is not None:
            state.probe_until = 0.0

    def state(self, key: str) -> Literal["closed", "half_open", "open"]:
        state = self._states.get(key)
        if state is None or state.opened == 0:
            return "closed"
        return "open" if self._clock() < state.open_until else "half_open"


def _cooldown(policy: CircuitPolicy, opened: int) -> float:
    return min(policy.max_cooldown, policy.cooldown * 2.0 ** (opened - 1))
