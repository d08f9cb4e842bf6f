"""An engine provider's settings from routes.yaml, as frozen data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

START_MODES = ("boot", "first_request")


def _no_env() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ReadyCheck:
    """The engine is ready when GET ``path`` answers 200 (llama.cpp: 503 while loading)."""

    path: str = "/health"
    timeout: float = 120.0
    interval: float = 0.25


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff after a crash doubles from ``base_delay`` up to ``max_delay``."""

    base_delay: float = 1.0
    max_delay: float = 30.0


@dataclass(frozen=True)
class QueueSpec:
    """Calls that find every slot taken wait here, at most ``max`` of them, each at
    most ``wait`` seconds (then a 429 with Retry-After)."""

    max: int = 64
    wait: float = 30.0


@dataclass(frozen=True)
class EngineSpec:
    # {port}, {host}, {python} and {replica} are filled in at every start; other braces
    # stay as written, so JSON or shell text in an argument survives.
    command: tuple[str, ...]
    port: int | None = None  # None: a free port is picked at every start
    host: str = "127.0.0.1"
    api_path: str = "/v1"
    replicas: int = 1
    start: str = "boot"
    ready: ReadyCheck = ReadyCheck()
    restart: RestartPolicy = RestartPolicy()
    # How long a request waits for a ready replica before it gets a 503.
    wait: float = 60.0
    idle_unload: float | None = None
    stop_timeout: float = 10.0
    metrics_path: str | None = None
    env: Mapping[str, str] = field(default_factory=_no_env)
    # Calls one replica serves at once (llama.cpp's --parallel): more wait in the queue.
    slots: int = 1
    queue: QueueSpec = QueueSpec()

    def runs_like(self, other: EngineSpec) -> bool:
        """The same processes: only the proxy's own admission (slots, queue) differs, which
        a reload changes in place rather than by restarting the engine."""
        return replace(self, slots=1, queue=QueueSpec()) == replace(
            other, slots=1, queue=QueueSpec()
        )

    def replica_port(self, index: int) -> int | None:
        return None if self.port is None else self.port + index
