"""Typed keys for the state kept on the aiohttp application (never in module globals)."""

from __future__ import annotations

from aiohttp import web

from proxy.config.reload import ConfigHolder
from proxy.engines.registry import Engines
from proxy.limits.admission import Accountant
from proxy.observe.metrics import Metrics
from proxy.readiness import Probes
from proxy.routing.balance import Balancer
from proxy.routing.circuit import CircuitBreakers
from proxy.upstream.client import UpstreamClient

CONFIG = web.AppKey("config", ConfigHolder)
# The proxied calls go through the lean client; the engines' probes and metrics scrapes
# use an aiohttp session of their own (engines/registry.py).
UPSTREAM_CLIENT = web.AppKey("upstream_client", UpstreamClient)
BALANCER = web.AppKey("balancer", Balancer)
BREAKERS = web.AppKey("breakers", CircuitBreakers)
ACCOUNTANT = web.AppKey("accountant", Accountant)
METRICS = web.AppKey("metrics", Metrics)
ENGINES = web.AppKey("engines", Engines)
PROBES = web.AppKey("probes", Probes)  # /readyz's TCP probes, shared within a second
