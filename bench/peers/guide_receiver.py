"""The integration guide's webhook receiver, the peer bench/compare runs beside syncd.

The guide (``/work/shared/reference/integration-guide-webhooks.txt``, "Endpoint Development",
"Signature Verification" and "Asynchronous Processing") sketches a Flask app that verifies the
``X-MasonHub-Signature`` HMAC-SHA256 of the raw body with ``hmac.compare_digest``, parses the
JSON, ``LPUSH``es it to a Redis list and answers ``{"status": "queued"}`` with 200 at once; a
separate worker process ``BRPOP``s the list and updates the ERP (``guide_worker.py``). This
module is that receiver, implemented as well as the design allows:

* **Server**: gunicorn with sync workers (the guide names no server; sync workers are
  gunicorn's default and what a Flask app gets unless it asks otherwise). bench/compare starts
  ``--workers 4``, two per core on this 2-core machine, inside gunicorn's "2-4 x cores"
  advice: a sync worker is blocked while it waits on Redis, so one per core would leave CPU
  idle. Sync workers close the connection after each answer (no keep-alive), as gunicorn
  documents; that is part of this design.
* **Signature**: the guide's ``verify_signature``: ``sha256=<hex>`` of HMAC-SHA256 over the
  raw body (``request.get_data()``), compared with ``hmac.compare_digest`` (as bytes, so a
  header with non-ASCII characters is a 401, not a 500). A missing or wrong signature is a
  401 ``{"error": "Invalid signature"}``, before anything is parsed or queued.
* **Queue**: ``request.get_json()`` (Flask answers 400 for a body that is not JSON), then
  ``LPUSH`` of ``json.dumps(event_data)`` as in the guide, through one ``redis.ConnectionPool``
  per gunicorn worker (created in each worker when it imports this module). The list's name
  comes from ``GUIDE_QUEUE`` (the guide's ``webhook_queue``), so that runs do not share one.
* **Redis** is the local server on 127.0.0.1:6379 as it is configured (here: no RDB
  snapshots, no AOF, i.e. nothing on disk). The guide says nothing about Redis persistence.
  The answer is sent once ``LPUSH`` returned, i.e. once the event is in Redis's memory.
* ``GET /readyz`` (200 when Redis answers PING) is not in the guide: it only lets the benchmark
  wait for the server the same way it waits for syncd.

Environment: ``GUIDE_WEBHOOK_SECRET`` (required), ``GUIDE_QUEUE`` (``webhook_queue``),
``GUIDE_PATH`` (``/webhooks/masonhub/orders``, the guide's route), ``GUIDE_REDIS_HOST``
(``127.0.0.1``), ``GUIDE_REDIS_PORT`` (``6379``).

    GUIDE_WEBHOOK_SECRET=s gunicorn --workers 4 --bind 127.0.0.1:8000 \\
        --pythonpath bench/peers guide_receiver:app
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

import redis
from flask import Flask, Response, jsonify, request

WEBHOOK_SECRET = os.environ["GUIDE_WEBHOOK_SECRET"]
QUEUE = os.environ.get("GUIDE_QUEUE", "webhook_queue")
PATH = os.environ.get("GUIDE_PATH", "/webhooks/masonhub/orders")

#: One pool per gunicorn worker; a sync worker uses one connection at a time.
pool = redis.ConnectionPool(
    host=os.environ.get("GUIDE_REDIS_HOST", "127.0.0.1"),
    port=int(os.environ.get("GUIDE_REDIS_PORT", "6379")),
    max_connections=4,
)
redis_client = redis.Redis(connection_pool=pool)

app = Flask(__name__)


def verify_signature(payload: bytes, signature: str, secret: str) -> bool:
    """The guide's check: ``sha256=<hex>`` of HMAC-SHA256 over the raw body, constant time."""
    expected_signature = hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()
    return hmac.compare_digest(
        f"sha256={expected_signature}".encode(), signature.encode("utf-8", "replace")
    )


@app.post(PATH)
def handle_order_webhook() -> tuple[Response, int]:
    """Verify, queue for the worker, and acknowledge at once."""
    signature = request.headers.get("X-MasonHub-Signature", "")
    if not verify_signature(request.get_data(), signature, WEBHOOK_SECRET):
        return jsonify({"error": "Invalid signature"}), 401
    event_data = request.get_json()
    redis_client.lpush(QUEUE, json.dumps(event_data))
    return jsonify({"status": "queued"}), 200


@app.get("/readyz")
def ready() -> tuple[Response, int]:
    """For the benchmark only: ready once Redis answers."""
    redis_client.ping()
    return jsonify({"status": "ready"}), 200
