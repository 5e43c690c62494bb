"""bench/erp_sink: a local ERP for bench/deliver that answers every PUT at once and counts it.

``PUT /api/{tail}`` reads the body and answers 200 ``{}``; per call it keeps the arrival time
(``time.time_ns()``, comparable across processes on one machine), the last path segment (the
order id) and the ``Idempotency-Key``. ``GET /stats`` gives the count, ``GET /calls`` every
call recorded since the last ``POST /reset`` (as three parallel lists), and ``POST /reset``
starts over. Binds 127.0.0.1 only.

With ``--record FILE`` every call is also appended to FILE before it is answered, and a sink
started again reads FILE back: a call the sink answered 200 is never forgotten, even when the
sink is killed with SIGKILL a moment later (bench/compare kills it to make an ERP outage).

    .venv/bin/python bench/erp_sink.py --port 9000 [--record FILE]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from aiohttp import web

CALLS = web.AppKey("calls", dict)
RECORD = web.AppKey("record", int)


def _empty() -> dict[str, list[object]]:
    return {"at_ns": [], "key": [], "idempotency_key": []}


def _add(calls: dict[str, list[object]], at: int, key: str, idempotency_key: str) -> None:
    calls["at_ns"].append(at)
    calls["key"].append(key)
    calls["idempotency_key"].append(idempotency_key)


async def put(request: web.Request) -> web.Response:
    """Accept a delivery: record it and answer 200 at once."""
    at = time.time_ns()
    await request.read()
    key = request.match_info["tail"].rsplit("/", 1)[-1]
    idempotency_key = request.headers.get("Idempotency-Key", "")
    _add(request.app[CALLS], at, key, idempotency_key)
    record = request.app.get(RECORD)
    if record is not None:  # in the kernel's hands before the 200 goes out
        os.write(record, f"{at}\t{key}\t{idempotency_key}\n".encode())
    return web.Response(body=b"{}", content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    """How many calls arrived since the last reset, and when the last one did."""
    calls = request.app[CALLS]
    last = calls["at_ns"][-1] if calls["at_ns"] else None
    return web.json_response({"count": len(calls["at_ns"]), "last_at_ns": last})


async def all_calls(request: web.Request) -> web.Response:
    """Every call since the last reset."""
    return web.json_response(request.app[CALLS])


async def reset(request: web.Request) -> web.Response:
    """Forget every call."""
    for values in request.app[CALLS].values():
        values.clear()
    record = request.app.get(RECORD)
    if record is not None:
        os.ftruncate(record, 0)
    return web.json_response({"count": 0})


def make_app(record: Path | None = None) -> web.Application:
    """The sink application; with ``record``, calls also go to (and come back from) a file."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[CALLS] = _empty()
    if record is not None:
        if record.exists():
            for line in record.read_text().splitlines():
                at, key, idempotency_key = line.split("\t")
                _add(app[CALLS], int(at), key, idempotency_key)
        app[RECORD] = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    app.router.add_put("/api/{tail:.*}", put)
    app.router.add_get("/stats", stats)
    app.router.add_get("/calls", all_calls)
    app.router.add_post("/reset", reset)
    return app


def main() -> None:
    """Serve on 127.0.0.1 until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--record", type=Path, help="append every call to this file too")
    args = parser.parse_args()
    app = make_app(args.record)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
