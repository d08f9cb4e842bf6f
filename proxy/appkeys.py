"""Typed keys for the state kept on the aiohttp application (never in module globals)."""

from __future__ import annotations

import aiohttp
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
# The proxied calls go through the lean client; aiohttp's session serves the engines'
# probes and metrics scrapes, where features matter more than microseconds.
UPSTREAM_CLIENT = web.AppKey("upstream_client", UpstreamClient)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
BALANCER = web.AppKey("balancer", Balancer)
BREAKERS = web.AppKey("breakers", CircuitBreakers)
ACCOUNTANT = web.AppKey("accountant", Accountant)
METRICS = web.AppKey("metrics", Metrics)
ENGINES = web.AppKey("engines", Engines)
PROBES = web.AppKey("probes", Probes)  # /readyz's TCP probes, shared within a second
