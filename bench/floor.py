"""The least an authenticated, durable webhook inbox can do on syncd's stack.

What issue 2's benchmark asks of syncd, and nothing more: the same aiohttp, the same default
event loop, the same SQLite settings (WAL, ``synchronous=FULL``) and the same group commit in
one writer thread. Per request it checks the content type, reads the body, verifies the HMAC
in constant time, parses the JSON, takes the message id and type, commits the row (answering
only once the commit is on disk) and writes one JSON log line to stdout. It has no merge, no
delivery, no metrics, no config, no validation of the envelope beyond its two keys, no
quarantine and no error handling a daemon needs.

``bench/ingest.py --floor`` runs it beside the bare handler and syncd, so a target stated as
a share of the bare handler can be set against what any implementation on this stack can
reach. It is a measuring stick, not a design: run it as
``python bench/floor.py --port N --db PATH [--path /webhooks/masonhub]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import orjson
from aiohttp import web

SECRET = b"bench-secret"
RECEIVED = b'{"status":"received"}'
DUPLICATE = b'{"status":"duplicate"}'


class Inbox:
    """One SQLite table, written by one thread; concurrent requests share each commit."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, dedupe_key TEXT UNIQUE,"
            " message_type TEXT, body TEXT, received_at TEXT, state TEXT)"
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="floor-store")
        self._queue: list[tuple[tuple[str, str, str, str], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    def _commit(self, rows: list[tuple[str, str, str, str]]) -> list[bool]:
        new = []
        self._db.execute("BEGIN IMMEDIATE")
        for row in rows:
            cursor = self._db.execute(
                "INSERT INTO inbox (dedupe_key, message_type, body, received_at, state)"
                " VALUES (?, ?, ?, ?, 'pending') ON CONFLICT DO NOTHING",
                row,
            )
            new.append(cursor.rowcount == 1)
        self._db.execute("COMMIT")
        return new

    async def add(self, row: tuple[str, str, str, str]) -> bool:
        """True if the row is new; returns once the transaction holding it has committed."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((row, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                new = await loop.run_in_executor(self._thread, self._commit, [r for r, _ in batch])
            except sqlite3.Error as exc:
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), is_new in zip(batch, new, strict=True):
                future.set_result(is_new)
        self._writer = None


def create_app(path: str, db: str) -> web.Application:
    """The floor application at syncd's webhook path, with /readyz for the benchmark."""
    inbox = Inbox(db)

    async def receive(request: web.Request) -> web.Response:
        started = time.perf_counter()
        if request.content_type != "application/json":
            return web.Response(status=415)
        body = await request.read()
        given = request.headers.get("X-MasonHub-Signature", "").removeprefix("sha256=")
        expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given):
            return web.Response(status=401)
        document = json.loads(body)
        message_id, message_type = document["message_id"], document["message_type"]
        now = datetime.now(UTC).isoformat()
        new = await inbox.add((message_id, message_type, body.decode(), now))
        line = {
            "event": "webhook.accepted",
            "level": "info",
            "timestamp": now,
            "outcome": "received" if new else "duplicate",
            "message_type": message_type,
            "message_id": message_id,
            "remote": request.remote,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
        sys.stdout.flush()
        return web.Response(body=RECEIVED if new else DUPLICATE, content_type="application/json")

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post(path, receive)
    app.router.add_get("/readyz", ready)
    return app


def main() -> None:
    """Serve on 127.0.0.1 until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="SQLite file (created)")
    parser.add_argument("--path", default="/webhooks/masonhub")
    args = parser.parse_args()
    web.run_app(
        create_app(args.path, args.db),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        handle_signals=True,
    )


if __name__ == "__main__":
    main()
