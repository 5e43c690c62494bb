"""The ceiling of syncd's stack: an aiohttp app that reads the body and answers 200.

Same framework, same default asyncio event loop, same path as syncd's webhook endpoint, no
access log; nothing is checked, parsed, stored or logged. ``bench/ingest.py`` runs it as its own
process: ``python bench/bare.py --port N [--path /webhooks/masonhub]``.

With ``--erp-sink`` it also answers every ``PUT`` with 200: the ERP that syncd's deliveries
go to during the benchmark, so its delivery workers do their normal work instead of retrying.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def received(request: web.Request) -> web.Response:
    """Read the whole body, as any real handler must, and acknowledge it."""
    await request.read()
    return web.json_response({"status": "received"})


async def ready(_request: web.Request) -> web.Response:
    """Answers like syncd's /readyz, so the benchmark waits for both the same way."""
    return web.json_response({"status": "ready"})


async def accepted(request: web.Request) -> web.Response:
    """An ERP that takes every PUT."""
    await request.read()
    return web.json_response({"status": "ok"})


def create_app(path: str, *, erp_sink: bool = False) -> web.Application:
    """The bare application, mounted at syncd's two webhook paths."""
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post(path, received)
    app.router.add_post(path + "/{message_type}", received)
    app.router.add_get("/readyz", ready)
    if erp_sink:
        app.router.add_put("/{tail:.*}", accepted)
    return app


def serve(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1 until SIGTERM or SIGINT, with no access log (also floor.py's
    server, so both are served alike)."""
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


def main() -> None:
    """Serve on 127.0.0.1 until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/webhooks/masonhub")
    parser.add_argument("--erp-sink", action="store_true", help="also answer any PUT with 200")
    args = parser.parse_args()
    serve(create_app(args.path, erp_sink=args.erp_sink), args.port)


if __name__ == "__main__":
    main()
