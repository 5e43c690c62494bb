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

With ``--erp BASE`` it is also the least a durable pipeline can do (``bench/compare.py
--targets floor``): once a row has committed, each order in it is sent at once, as
``PUT BASE/orders/{customer_identifier}`` with its status and shipments, by one aiohttp client
session with at most 8 calls in flight (syncd's default ``erp.concurrency``); the row is then
marked delivered in the next inbox transaction. There is no merge per entity, no outbox, no
lease, no retry and no redelivery after a restart: every step syncd adds between a durable
inbox and the ERP is left out, so that its latency can be set against the guide's design's.
``--erp-client threads`` sends from 8 threads with ``http.client``, as the guide's worker does,
fed by the store thread straight after the commit, so no delivery waits for the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import http.client
import json
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from aiohttp import ClientSession, web
from bare import serve

SECRET = b"bench-secret"
#: Most ERP calls in flight at once (syncd's default erp.concurrency).
CONCURRENCY = 8
RECEIVED = b'{"status":"received"}'
DUPLICATE = b'{"status":"duplicate"}'


class Inbox:
    """One SQLite table, written by one thread; concurrent requests share each commit."""

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, dedupe_key TEXT UNIQUE,"
            " message_type TEXT, body TEXT, received_at TEXT, state TEXT)"
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="floor-store")
        #: (row, its parsed ``data`` for a hand-off (see below), the caller's future)
        self._queue: list[tuple[tuple[str, str, str, str], Any, asyncio.Future[int | None]]] = []
        self._writer: asyncio.Task[None] | None = None
        #: Ids of rows whose orders the ERP has, to be marked in the next transaction (a deque:
        #: sender threads append to it).
        self._delivered: deque[int] = deque()
        #: Called in the store thread with (row id, message id, data) of each new row once its
        #: transaction committed; None: the event loop sends (Erp.send).
        self.handoff: Callable[[list[tuple[int, str, Any]]], None] | None = None

    def _commit(
        self, rows: Sequence[tuple[str, str, str, str]], payloads: Sequence[Any], done: list[int]
    ) -> list[int | None]:
        new: list[int | None] = []
        self._db.execute("BEGIN IMMEDIATE")
        for row in rows:
            cursor = self._db.execute(
                "INSERT INTO inbox (dedupe_key, message_type, body, received_at, state)"
                " VALUES (?, ?, ?, ?, 'pending') ON CONFLICT DO NOTHING",
                row,
            )
            new.append(cursor.lastrowid if cursor.rowcount == 1 else None)
        if done:
            self._db.executemany(
                "UPDATE inbox SET state = 'delivered' WHERE id = ?", [(i,) for i in done]
            )
        self._db.execute("COMMIT")
        if self.handoff is not None:
            rows_ = zip(new, rows, payloads, strict=True)
            self.handoff([(i, row[0], data) for i, row, data in rows_ if i is not None])
        return new

    def mark_delivered(self, row_id: int) -> None:
        """The ERP has the row's orders: record it with the next transaction (any thread)."""
        self._delivered.append(row_id)

    async def add(self, row: tuple[str, str, str, str], payload: Any = None) -> int | None:
        """The row's id if it is new (else None), once the transaction holding it committed."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((row, payload, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            rows, payloads, futures = zip(*batch, strict=True)
            done = [self._delivered.popleft() for _ in range(len(self._delivered))]
            try:
                new = await loop.run_in_executor(self._thread, self._commit, rows, payloads, done)
            except sqlite3.Error as exc:
                for future in futures:
                    future.set_exception(exc)
                continue
            for future, is_new in zip(futures, new, strict=True):
                future.set_result(is_new)
        self._writer = None


def order_puts(
    prefix: str, headers: dict[str, str], message_id: str, data: Any
) -> list[tuple[str, bytes, dict[str, str]]]:
    """(URL, body, headers) of the PUT for each order in an envelope's ``data`` (a list or
    one object): its status and shipments, to ``{prefix}/orders/{customer_identifier}``."""
    puts = []
    for order in data if isinstance(data, list) else [data]:
        if not isinstance(order, dict):
            continue
        body = {
            "customer_identifier": order.get("customer_identifier"),
            "status": order.get("status"),
            "shipments": order.get("shipments"),
            "updated_at": order.get("updated_at"),
        }
        url = f"{prefix}/orders/{quote(str(body['customer_identifier']), safe='')}"
        puts.append((url, orjson.dumps(body), {**headers, "Idempotency-Key": message_id}))
    return puts


class ThreadErp:
    """``--erp-client threads``: the store thread hands each committed row to CONCURRENCY
    threads, each with a keep-alive ``http.client`` connection, as the guide's worker calls
    the ERP. The event loop takes no part in a delivery."""

    def __init__(self, base: str, token: str, inbox: Inbox) -> None:
        parts = urlsplit(base)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self._inbox = inbox
        self._queue: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        for _ in range(CONCURRENCY):
            threading.Thread(target=self._run, daemon=True).start()
        inbox.handoff = self._handoff

    def _handoff(self, rows: list[tuple[int, str, Any]]) -> None:
        for row in rows:
            self._queue.put(row)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self._host, self._port)
        while True:
            row_id, message_id, data = self._queue.get()
            ok = True
            for url, body, headers in order_puts(self._prefix, self._headers, message_id, data):
                conn.request("PUT", url, body=body, headers=headers)
                answer = conn.getresponse()
                answer.read()
                ok = ok and answer.status < 300
            if ok:
                self._inbox.mark_delivered(row_id)

    def send(self, row_id: int, message_id: str, data: Any) -> None:
        """Nothing: the store thread handed the row over already."""

    async def close(self) -> None:
        """Nothing: the threads die with the process."""


class Erp:
    """Sends each committed row's orders to the ERP, at most CONCURRENCY calls at once."""

    def __init__(self, base: str, token: str, inbox: Inbox) -> None:
        self._base = base.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self._inbox = inbox
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._session: ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, row_id: int, message_id: str, data: Any) -> None:
        """Deliver the row's orders in the background."""
        task = asyncio.create_task(self._send(row_id, message_id, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, row_id: int, message_id: str, data: Any) -> None:
        if self._session is None:
            self._session = ClientSession()
        async with self._slots:
            for url, body, headers in order_puts(self._base, self._headers, message_id, data):
                async with self._session.put(url, data=body, headers=headers) as answer:
                    await answer.read()
                    if answer.status >= 300:
                        return  # the floor does not retry; the row stays pending
        self._inbox.mark_delivered(row_id)

    async def close(self) -> None:
        """Let calls in flight finish, then close the session."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def create_app(
    path: str,
    db: str,
    erp: str | None = None,
    token: str = "",
    synchronous: str = "FULL",
    client: str = "aiohttp",
) -> web.Application:
    """The floor application at syncd's webhook path, with /readyz for the benchmark."""
    inbox = Inbox(db, synchronous)
    sender: Erp | ThreadErp | None = None

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
        data = document.get("data")
        row_id = await inbox.add((message_id, message_type, body.decode(), now), data)
        new = row_id is not None
        if sender is not None and row_id is not None:
            sender.send(row_id, message_id, data)
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

    async def erp_client(_app: web.Application) -> Any:
        nonlocal sender
        if erp is not None:
            sender = (ThreadErp if client == "threads" else Erp)(erp, token, inbox)
        yield
        if sender is not None:
            await sender.close()

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post(path, receive)
    app.router.add_get("/readyz", ready)
    app.cleanup_ctx.append(erp_client)
    return app


def main() -> None:
    """Serve on 127.0.0.1 until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="SQLite file (created)")
    parser.add_argument("--path", default="/webhooks/masonhub")
    parser.add_argument("--erp", help="ERP base URL: send each committed row's orders there")
    parser.add_argument("--token", default="", help="ERP bearer token")
    parser.add_argument(
        "--synchronous",
        choices=("FULL", "NORMAL"),
        default="FULL",
        help="SQLite's synchronous for the inbox commit; NORMAL skips the fsync, to measure "
        "what durability costs (FULL)",
    )
    parser.add_argument(
        "--erp-client",
        choices=("aiohttp", "threads"),
        default="aiohttp",
        help="aiohttp: the event loop sends once the commit answered; threads: the store "
        "thread hands rows to http.client threads (aiohttp)",
    )
    args = parser.parse_args()
    app = create_app(args.path, args.db, args.erp, args.token, args.synchronous, args.erp_client)
    serve(app, args.port)


if __name__ == "__main__":
    main()
