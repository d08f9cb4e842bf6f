"""Circuit breaking per endpoint: take a failing replica out, probe it before trusting it.

closed ──N consecutive failures──▶ open (cool-down) ──cool-down over──▶ half-open
   ▲                                  ▲                                   │ one probe
   └────────── probe succeeds ────────┼───────── probe fails ◀────────────┘
                                      (cool-down doubles, up to max_cooldown)

A new failure can only push ``open_until`` later, never earlier. While a probe is
out, other calls treat the endpoint as open; a probe that never reports back (its
process died) expires after ``probe_lease`` seconds so that another can go.

Openings and closings are reported to ``on_change`` (circuit_sync.py shares them
through Redis) and remote ones are merged with ``merge``, so that every process of a
deployment agrees on which endpoints are out.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from proxy.config.model import CircuitPolicy


class Passage(Enum):
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


@dataclass(frozen=True)
class Change:
    """A circuit opened (or its cool-down grew) or closed, on the wall clock."""

    key: str
    opened: int  # 0: closed
    open_until: float  # seconds since the epoch


class CircuitBreakers:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._states: dict[str, _State] = {}
        self.on_change: Callable[[Change], None] | None = None
        # Elects one probe among all processes (circuit_sync.py); None: this one decides.
        self.claim_probe: Callable[[str, float], Awaitable[bool]] | None = None
        self.end_probe: Callable[[str], None] | None = None

    def admit(self, key: str, probe_lease: float) -> Passage:
        state = self._states.get(key)
        if state is None or state.opened == 0:
            return Passage.CLOSED
        now = self._clock()
        if now < state.open_until or now < state.probe_until:
            return Passage.OPEN
        state.probe_until = now + probe_lease
        return Passage.PROBE

    def succeeded(self, key: str) -> None:
        state = self._states.pop(key, None)
        if state is not None and state.opened:
            self._tell(Change(key, 0, 0.0))

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
            self._tell(Change(key, state.opened, time.time() + state.open_until - now))

    def released(self, key: str) -> None:
        """A call that neither succeeded nor failed (e.g. a 429): let the next one probe."""
        state = self._states.get(key)
        if state is not None:
            state.probe_until = 0.0

    def merge(self, change: Change) -> None:
        """Another process's change: an opening can only extend, a closing resets."""
        if not change.opened:
            self._states.pop(change.key, None)
            return
        state = self._states.setdefault(change.key, _State())
        until = self._clock() + (change.open_until - time.time())
        state.opened = max(state.opened, change.opened)
        state.open_until = max(state.open_until, until)
        state.probe_until = 0.0

    def _tell(self, change: Change) -> None:
        if self.on_change is not None:
            self.on_change(change)

    def state(self, key: str) -> Literal["closed", "half_open", "open"]:
        state = self._states.get(key)
        if state is None or state.opened == 0:
            return "closed"
        return "open" if self._clock() < state.open_until else "half_open"


def _cooldown(policy: CircuitPolicy, opened: int) -> float:
    return min(policy.max_cooldown, policy.cooldown * 2.0 ** (opened - 1))
