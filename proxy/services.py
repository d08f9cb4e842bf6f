"""What the proxy's parts share for the app's lifetime, in one typed holder.

The aiohttp app keeps it under ``SERVICES``; a call reaches it through its exchange, so
the call path never sees aiohttp's app. What a start-up step opens (the upstream
client, the accountant, the engines) is set by app.py's cleanup contexts before the
server takes its first call. Never in module globals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.config.reload import ConfigHolder
from proxy.engines.registry import Engines
from proxy.limits.admission import Accountant
from proxy.limits.ledger_keeper import LedgerKeeper
from proxy.observe.metrics import Metrics
from proxy.readiness import Probes
from proxy.routing.balance import Balancer
from proxy.routing.circuit import CircuitBreakers
from proxy.upstream.client import UpstreamClient

if TYPE_CHECKING:
    from proxy.observe.spans import Tracing


class Services:
    __slots__ = (
        "accountant", "balancer", "breakers", "clock", "config", "engines", "ledger", "metrics",
        "probes", "tracing", "upstream_client",
    )  # fmt: skip

    # Set at start-up, by app.py's cleanup contexts.
    upstream_client: UpstreamClient  # the proxied calls' HTTP/1.1 client
    accountant: Accountant  # limits and ledger
    engines: Engines

    def __init__(self, config: ConfigHolder, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        # Balancing counters and circuit state outlive a config reload: an endpoint that
        # keeps its URL keeps its history.
        self.balancer = Balancer()
        self.breakers = CircuitBreakers()
        self.probes = Probes()  # /readyz's TCP probes, shared within a second
        # The wall clock team keys expire by (a test sets its own).
        self.clock: Callable[[], float] = time.time
        # OpenTelemetry traces (routes.yaml telemetry:), opened by app.py; None: off.
        self.tracing: Tracing | None = None
        # The embedded ledger's file, opened by app.py; None: Redis, or memory only.
        self.ledger: LedgerKeeper | None = None


SERVICES = web.AppKey("services", Services)
