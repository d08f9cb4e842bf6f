"""The issue's kind of fake upstream: an aiohttp app, as the tests' fake upstreams are.

The issue's targets on throughput are shares of direct-to-upstream, and a share
depends on how fast the upstream is: its own run had a bare aiohttp relay keep 36 %
of direct and Envoy 91 %, which only an upstream of about an aiohttp server's speed
gives. bench/upstream.py is many times faster than that (the relay keeps a few percent
of it). This one answers the same fixed completion through aiohttp's own server, so
that the bench can also read the throughput targets at the issue's calibration; the
table prints the relay's share beside them, so the calibration can be checked.
``python -m bench.aiohttp_upstream --port 9001``
"""

from __future__ import annotations

import argparse

from aiohttp import web

from bench.upstream import COMPLETION


async def complete(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=COMPLETION, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
