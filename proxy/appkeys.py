"""Typed keys for the state kept on the aiohttp application (never in module globals)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.engines.registry import Engines
from proxy.reload import ConfigHolder

CONFIG = web.AppKey("config", ConfigHolder)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
ENGINES = web.AppKey("engines", Engines)
