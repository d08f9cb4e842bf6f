"""Who can reach the proxy: a config without teams serves anyone who can connect, with the
provider keys, so it is refused on an address beyond this host (at start and on every
reload) unless the operator passed ``--allow-anonymous``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from proxy.config.load import ConfigError, load_config
from proxy.config.model import Config


@dataclass(frozen=True)
class Exposure:
    """Where the proxy listens, as the worker was started."""

    host: str = "127.0.0.1"
    allow_anonymous: bool = False

    def problem(self, config: Config) -> str | None:
        """Why ``config`` must not serve on this address, or None."""
        if config.teams or self.allow_anonymous or loopback(self.host):
            return None
        return (
            f"routes.yaml configures no team, so anyone who reaches {self.host} could use "
            "your provider keys. Add teams (python -m proxy keygen TEAM --name NAME) or pass "
            "--allow-anonymous."
        )


def load_to_serve(path: Path, exposure: Exposure) -> Config:
    """The file's config, refused like an invalid file if this address must not serve it:
    at start, on a reload, and when the supervisor starts a worker again."""
    config = load_config(path)
    problem = exposure.problem(config)
    if problem:
        raise ConfigError([problem])
    return config


def loopback(host: str) -> bool:
    """A loopback IP literal, or the name ``localhost`` taken literally (RFC 6761 reserves
    it for loopback). Other names count as public whatever they resolve to now: what a
    name resolves to can change after this check."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"
