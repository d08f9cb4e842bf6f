"""The configuration as typed, frozen data. ``config_load`` builds it from routes.yaml."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.engines.spec import EngineSpec

STRATEGIES = ("fallback",)


def frozen_map(items: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
class Timeouts:
    """Seconds. A first token can take tens of seconds and a stream can last minutes."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key: str | None = None
    # Set when routes.yaml names a key variable that is not in the environment: the
    # provider is then refused on use with an error naming the variable.
    missing_key_var: str | None = None
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    timeouts: Timeouts = Timeouts()
    # A required provider must be reachable for /readyz to answer 200.
    required: bool = False
    # A local engine the proxy runs itself; its base_url is then a template whose port
    # is filled in per call from the replica that serves it (see proxy.engines.lease).
    engine: EngineSpec | None = None

    def url(self, endpoint: str) -> str:
        """Join, never guess: W&B's ``/v1`` and Prime's ``/api/v1`` both stay as given."""
        return self.base_url.rstrip("/") + "/" + endpoint.lstrip("/")


@dataclass(frozen=True)
class Target:
    provider: str
    model: str


@dataclass(frozen=True)
class Model:
    id: str
    targets: tuple[Target, ...]
    strategy: str = "fallback"
    owned_by: str = "system"


@dataclass(frozen=True)
class ServerSettings:
    max_body_bytes: int = 16 * 1024 * 1024
    reload_interval: float = 1.0


@dataclass(frozen=True)
class Config:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    server: ServerSettings = ServerSettings()
    redis_url: str = ""
    # Warnings that do not make the file invalid (a provider key variable unset).
    warnings: tuple[str, ...] = ()
