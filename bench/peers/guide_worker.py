"""The integration guide's "separate worker process": BRPOP the webhook queue, update the ERP.

The other half of the peer in ``guide_receiver.py`` (see its docstring for the guide's design).
The guide's worker is a loop of ``redis_client.brpop('webhook_queue')``, ``json.loads`` and
``process_order_event(event_data)``, which skips an event whose id was processed before
(``is_event_processed``), calls ``update_order_in_erp`` and then marks the id processed. This
module is that loop, implemented as well as the design allows:

* **Threads**: ``--threads`` loops in one process (default 8, syncd's default
  ``erp.concurrency``, so both have as many ERP calls in flight at most). Each has its own
  blocking ``BRPOP`` connection from one ``redis.ConnectionPool`` and its own keep-alive HTTP
  connection to the ERP (``http.client``; the guide names no HTTP library).
* **Idempotency**: the guide's ``is_event_processed``/``mark_event_processed`` as a Redis set
  ``<queue>:processed`` (``SISMEMBER`` before, ``SADD`` after the ERP answered 2xx), keyed by
  the envelope's ``event_id``, else ``message_id``.
* **ERP calls** are those of syncd's ``http`` adapter as far as the design allows: for each
  order in the event's ``data``, ``PUT {--erp}/orders/{customer_identifier}`` (URL-quoted)
  with ``{"customer_identifier", "masonhub_id", "status", "shipments": [...], "shorts",
  "updated_at"}`` and ``Authorization: Bearer`` when ``--token`` is set. There is no merge: the
  event's own state is sent, as the guide does.
* **Failures**: the guide leaves "Error Handling & Retries" empty. Here a Redis error is
  printed and the loop goes on after 1 s. An ERP connection error, timeout, 408, 425, 429 or
  5xx is retried in this process after 0.5, 1, 2 and 4 s; after the fifth failure, or on
  another status, the event is logged and dropped (nothing in the design can keep it). While
  it is being retried it exists only in this process's memory.
* **What the design loses**: ``BRPOP`` removes the event from Redis before the ERP has it. A
  worker that dies (kill -9, OOM, a deploy) between ``BRPOP`` and the ERP's answer loses every
  event it holds; nothing sends them again, since MasonHub already got its 200.

Its Redis connections are named ``guide_worker:<queue>`` (CLIENT SETNAME), so that the
benchmark can see in CLIENT LIST how many threads are not blocked in BRPOP, i.e. hold an event.

SIGTERM or SIGINT: every thread finishes the event it holds, then the process exits. Prints
``guide_worker ready`` once Redis answered and the threads run.

    python bench/peers/guide_worker.py --erp http://127.0.0.1:9000/api --queue webhook_queue
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit

import redis

#: ERP answers worth trying again, besides 5xx.
TRANSIENT = frozenset({408, 425, 429})
#: Seconds before the 2nd, 3rd, ... attempt of one ERP call.
BACKOFF = (0.5, 1.0, 2.0, 4.0)
SHIPMENT_FIELDS = (
    "shipment_id",
    "tracking_number",
    "tracking_url",
    "shipping_provider",
    "shipper_service_level",
    "shipment_date_time",
    "shipment_line_items",
)


class TransientError(Exception):
    """The ERP could not be reached, or answered with a status worth retrying."""


class Erp:
    """One keep-alive HTTP connection to the ERP (one per thread)."""

    def __init__(self, base_url: str, token: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def put(self, path: str, body: dict[str, Any]) -> int:
        """PUT ``body``; the status, or TransientError for a lost connection or timeout."""
        data = json.dumps(body).encode()
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self._conn.request("PUT", self.prefix + path, body=data, headers=self.headers)
            answer = self._conn.getresponse()
            answer.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            self._conn = None
            raise TransientError(f"{type(exc).__name__}: {exc}") from exc
        if answer.will_close:
            self._conn.close()
            self._conn = None
        return answer.status


def order_body(order: dict[str, Any]) -> dict[str, Any]:
    """The order's state in the shape syncd's http adapter sends (absent fields left out)."""
    shipments = [
        {k: s[k] for k in SHIPMENT_FIELDS if s.get(k) is not None}
        for s in order.get("shipments") or []
        if isinstance(s, dict)
    ]
    body = {
        "customer_identifier": order.get("customer_identifier"),
        "masonhub_id": order.get("id"),
        "status": order.get("status"),
        "shipments": shipments or None,
        "shorts": order.get("shorts"),
        "updated_at": order.get("updated_at"),
    }
    return {k: v for k, v in body.items() if v is not None}


def orders_of(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The order records of a MasonHub envelope (``data`` a list or one object)."""
    data = event.get("data", [])
    items = data if isinstance(data, list) else [data]
    return [item for item in items if isinstance(item, dict) and item.get("customer_identifier")]


class Worker:
    """The guide's ``process_webhook_queue``, run by ``threads`` threads."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pool = redis.ConnectionPool(
            host=args.redis_host,
            port=args.redis_port,
            max_connections=args.threads + 2,
            client_name=f"guide_worker:{args.queue}",
        )
        self.redis = redis.Redis(connection_pool=self.pool)
        self.processed = f"{args.queue}:processed"
        self.stopping = threading.Event()

    def process_webhook_queue(self) -> None:
        """One thread's loop: BRPOP an event, process it, until told to stop."""
        erp = Erp(self.args.erp, self.args.token, self.args.timeout)
        while not self.stopping.is_set():
            try:
                # A timeout only so that a stopping thread notices; the guide blocks forever.
                item = self.redis.brpop([self.args.queue], timeout=1)
                if item is not None:
                    self.process_order_event(json.loads(item[1]), erp)
            except redis.RedisError as exc:
                print(f"guide_worker: Redis: {exc}", flush=True)
                time.sleep(1.0)

    def process_order_event(self, event_data: dict[str, Any], erp: Erp) -> None:
        """The guide's idempotent processing: skip if seen, update the ERP, mark as seen."""
        event_id = event_data.get("event_id") or event_data.get("message_id")
        if event_id and self.redis.sismember(self.processed, event_id):
            return
        if self.update_order_in_erp(event_data, erp) and event_id:
            self.redis.sadd(self.processed, event_id)

    def update_order_in_erp(self, event_data: dict[str, Any], erp: Erp) -> bool:
        """PUT every order of the event; False if one could not be delivered (then dropped)."""
        delivered = True
        for order in orders_of(event_data):
            path = f"/orders/{quote(str(order['customer_identifier']), safe='')}"
            delivered = self._put(erp, path, order_body(order)) and delivered
        return delivered

    def _put(self, erp: Erp, path: str, body: dict[str, Any]) -> bool:
        for attempt in range(len(BACKOFF) + 1):
            try:
                status = erp.put(path, body)
                if 200 <= status < 300:
                    return True
                if status not in TRANSIENT and status < 500:
                    print(f"guide_worker: PUT {path}: {status}, dropped", flush=True)
                    return False
                reason = f"status {status}"
            except TransientError as exc:
                reason = str(exc)
            if attempt < len(BACKOFF):
                time.sleep(BACKOFF[attempt])
        print(f"guide_worker: PUT {path}: {reason} after {attempt + 1} tries, dropped", flush=True)
        return False


def main() -> None:
    """Run the loops until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--erp", required=True, help="ERP base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--token", default="", help="ERP bearer token")
    parser.add_argument("--queue", default="webhook_queue", help="the Redis list")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=15.0, help="ERP call timeout, s")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6379)
    args = parser.parse_args()
    worker = Worker(args)
    worker.redis.ping()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: worker.stopping.set())
    threads = [
        threading.Thread(target=worker.process_webhook_queue, name=f"worker-{i}")
        for i in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    print("guide_worker ready", flush=True)
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.5)
    worker.pool.disconnect()


if __name__ == "__main__":
    main()
