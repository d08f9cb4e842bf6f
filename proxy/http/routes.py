"""Path → handler, and nothing else."""

from __future__ import annotations

from aiohttp import web

from proxy.call.request import CHAT, COMPLETIONS, EMBEDDINGS, Api
from proxy.http import handlers
from proxy.http.aiohttp_exchange import proxied

# The proxied routes, which the lean front (proxy/http/front.py) also serves.
PROXIED: dict[str, Api] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
}


def add_routes(app: web.Application) -> None:
    for path, api in PROXIED.items():
        app.router.add_post(path, proxied(api))
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/models/{model:.+}", handlers.get_model)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/v1/usage", handlers.usage)
    app.router.add_get("/metrics", handlers.scrape_metrics)
