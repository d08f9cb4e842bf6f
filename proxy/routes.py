"""Path → handler, and nothing else."""

from __future__ import annotations

from aiohttp import web

from proxy import handlers
from proxy.pipeline import proxied
from proxy.request_checks import CHAT, COMPLETIONS, EMBEDDINGS


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", proxied(CHAT))
    app.router.add_post("/v1/completions", proxied(COMPLETIONS))
    app.router.add_post("/v1/embeddings", proxied(EMBEDDINGS))
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/models/{model:.+}", handlers.get_model)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/v1/usage", handlers.usage)
    app.router.add_get("/metrics", handlers.scrape_metrics)
