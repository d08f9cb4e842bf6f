"""A reference point, not the product: the least an aiohttp relay can do.

One pooled client session, the body passed through, the answer relayed (streams chunk
by chunk), and nothing else: no routing, retries, limits, metrics or access log. The
issue's targets say the proxy, with every feature on, must beat this; the bench runs it
in the same way as the proxy (one process, uvloop) so the two can be compared.
``python -m bench.bare_relay --port 8081 --upstream http://127.0.0.1:9000``
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    url = request.app[UPSTREAM] + request.path
    async with request.app[SESSION].post(
        url, data=body, headers={"Content-Type": "application/json"}
    ) as answer:
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
        if answer.content_type != "text/event-stream":
            return web.Response(status=answer.status, headers=headers, body=await answer.read())
        out = web.StreamResponse(status=answer.status, headers=headers)
        await out.prepare(request)
        async for chunk in answer.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_post("/{tail:.*}", relay)
    app.router.add_get("/healthz", _ok)
    return app


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(
        make_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
