"""The webhook receiver on a real aiohttp server: authentication, dedupe, answers, durability."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.engine import make_url

from syncd.app import RECEIVER, create_admin_app, create_app
from syncd.logs import configure_logging
from syncd.messages import parse_body
from syncd.store import SqlStore
from syncd.testing import RecordingErp, TcpProxy, dumps, envelope, sign
from tests.conftest import SECRET, make_settings

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
Client = TestClient[web.Request, web.Application]
PATH = "/webhooks/masonhub"

ORDER_FULFILLED = envelope(
    "orderEvent",
    [
        {
            "id": "cb65fyn5-534t-7892-hg67-57g173b54133",
            "customer_identifier": "129374",
            "status": "fulfilled",
            "shipments": [{"shipment_id": "s1", "tracking_number": "1Z999"}],
        }
    ],
    "0896116f-e54b-4756-9d3e-1b0c4a25d821",
)


@pytest.fixture
def make_client(store_url: str, aiohttp_client: ClientFactory) -> Callable[..., Awaitable[Client]]:
    """Start syncd's app on a real local server with the given setting overrides.

    The store is set up first so that it is emptied only after the servers have stopped.
    """

    async def make(**sections: Any) -> Client:
        app = create_app(make_settings(store_url, **sections), adapter=RecordingErp())
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: Callable[..., Awaitable[Client]]) -> Client:
    """syncd signed with SECRET, every message type subscribed."""
    return await make_client()


async def post(
    client: Client,
    body: bytes,
    *,
    secret: str | None = SECRET,
    path: str = PATH,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    sent = {"Content-Type": "application/json"}
    if secret is not None:
        sent["X-MasonHub-Signature"] = sign(body, secret)
    sent.update(headers or {})
    response = await client.post(path, data=body, headers=sent)
    return response.status, await response.json()


async def stored(client: Client) -> list[str]:
    store: SqlStore = client.app[RECEIVER]._store
    return [m.dedupe_key for m in await store.list_messages()]


async def quarantined(client: Client) -> list[bytes]:
    store: SqlStore = client.app[RECEIVER]._store
    return [q.body for q in await store.list_quarantine()]


# --- signatures ---------------------------------------------------------------------------


async def test_prefixed_signature_accepted(client: Client) -> None:
    """A `sha256=<hex>` signature over the raw body is accepted and the message stored."""
    body = dumps(ORDER_FULFILLED)
    assert await post(client, body) == (200, {"status": "received"})
    assert await stored(client) == [ORDER_FULFILLED["message_id"]]


async def test_bare_hex_signature_accepted(client: Client) -> None:
    """A bare hex signature (upper or lower case) is accepted too."""
    body = dumps(ORDER_FULFILLED)
    signature = sign(body, SECRET, prefix=False).upper()
    status, _ = await post(client, body, secret=None, headers={"X-MasonHub-Signature": signature})
    assert status == 200


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("sha256=", id="prefix-only"),
        pytest.param("sha256=" + "zz" * 32, id="non-hex"),
        pytest.param("not a signature at all", id="garbage"),
        pytest.param("sha256=" + "ab" * 31, id="short"),
        pytest.param(sign(b"other body", SECRET), id="other-body"),
        pytest.param(sign(dumps(ORDER_FULFILLED), "wrong-secret"), id="wrong-secret"),
    ],
)
async def test_bad_signature_rejected(client: Client, signature: str | None) -> None:
    """A signature that is not HMAC-SHA256 of this body under our secret: 401, nothing stored."""
    headers = {} if signature is None else {"X-MasonHub-Signature": signature}
    status, answer = await post(client, dumps(ORDER_FULFILLED), secret=None, headers=headers)
    assert (status, answer["status"]) == (401, "unauthenticated")
    assert await stored(client) == []
    assert await quarantined(client) == []


async def test_tampered_body_rejected(client: Client) -> None:
    """A body changed after signing is 401."""
    body = dumps(ORDER_FULFILLED)
    signature = sign(body, SECRET)
    tampered = body.replace(b"1Z999", b"1Z000")
    status, _ = await post(
        client, tampered, secret=None, headers={"X-MasonHub-Signature": signature}
    )
    assert status == 401
    assert await stored(client) == []


async def test_secret_rotation(make_client: Callable[..., Awaitable[Client]]) -> None:
    """With two secrets configured, a body signed with either one is accepted."""
    client = await make_client(webhooks={"signing_secrets": ["old-secret", "new-secret"]})
    first = envelope("orderEvent", [], "m-old")
    second = envelope("orderEvent", [], "m-new")
    assert (await post(client, dumps(first), secret="old-secret"))[0] == 200
    assert (await post(client, dumps(second), secret="new-secret"))[0] == 200
    assert (await post(client, dumps(second), secret=SECRET))[0] == 401
    assert sorted(await stored(client)) == ["m-new", "m-old"]


# --- callback token ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": "Bearer cb-token"}, 200),
        ({"Authorization": "bearer cb-token"}, 200),
        ({"X-MasonHub-Token": "cb-token"}, 200),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"X-MasonHub-Token": ""}, 401),
        ({"Authorization": "Basic cb-token"}, 401),
        ({}, 401),
    ],
)
async def test_callback_token(
    make_client: Callable[..., Awaitable[Client]], headers: dict[str, str], status: int
) -> None:
    """The registered callback token is accepted as a bearer token or X-MasonHub-Token."""
    client = await make_client(webhooks={"signing_secrets": [], "callback_token": "cb-token"})
    got, _ = await post(client, dumps(ORDER_FULFILLED), secret=None, headers=headers)
    assert got == status
    assert len(await stored(client)) == (1 if status == 200 else 0)


async def test_token_and_secret_both_required(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    """When both a secret and a token are configured, a request must carry both."""
    client = await make_client(webhooks={"callback_token": "cb-token"})
    body = dumps(ORDER_FULFILLED)
    assert (await post(client, body))[0] == 401
    token = {"X-MasonHub-Token": "cb-token"}
    assert (await post(client, body, secret=None, headers=token))[0] == 401
    assert (await post(client, body, headers=token))[0] == 200


# --- dedupe --------------------------------------------------------------------------------


async def test_duplicate_message_id(client: Client) -> None:
    """The same message twice: first received, then duplicate, one stored row."""
    body = dumps(ORDER_FULFILLED)
    assert await post(client, body) == (200, {"status": "received"})
    assert await post(client, body) == (200, {"status": "duplicate"})
    assert len(await stored(client)) == 1


async def test_fifty_concurrent_duplicates(client: Client) -> None:
    """50 concurrent deliveries of one message store exactly one row; one answer says received."""
    body = dumps(ORDER_FULFILLED)
    answers = await asyncio.gather(*(post(client, body) for _ in range(50)))
    assert all(status == 200 for status, _ in answers)
    outcomes = sorted(answer["status"] for _, answer in answers)
    assert outcomes.count("received") == 1
    assert outcomes.count("duplicate") == 49
    assert len(await stored(client)) == 1


async def test_dedupe_falls_back_to_body_hash(client: Client) -> None:
    """Without message_id or event_id, the same body twice is a duplicate; another body is not."""
    first = dumps(envelope("orderEvent", [{"customer_identifier": "1"}], None))
    second = dumps(envelope("orderEvent", [{"customer_identifier": "2"}], None))
    assert (await post(client, first))[1]["status"] == "received"
    assert (await post(client, first))[1]["status"] == "duplicate"
    assert (await post(client, second))[1]["status"] == "received"
    assert all(key.startswith("sha256:") for key in await stored(client))


# --- body shapes ---------------------------------------------------------------------------


async def test_integration_guide_curl_example(client: Client) -> None:
    """The guide's curl example (a legacy order.shipped body) is accepted when signed."""
    body = b'{"event_type": "order.shipped", "order_id": "test"}'
    assert await post(client, body) == (200, {"status": "received"})
    store: SqlStore = client.app[RECEIVER]._store
    [message] = await store.list_messages()
    assert (message.message_type, message.body) == ("orderEvent", body)


async def test_legacy_event_id_dedupes(client: Client) -> None:
    """A legacy event is deduplicated by its event_id."""
    event = {
        "event_type": "inventory.updated",
        "event_id": "evt-1",
        "sku": "ABC",
        "timestamp": "2024-01-01T10:30:00Z",
    }
    assert (await post(client, dumps(event)))[1]["status"] == "received"
    event["timestamp"] = "2024-01-01T10:31:00Z"
    assert (await post(client, dumps(event)))[1]["status"] == "duplicate"
    assert await stored(client) == ["evt-1"]


def test_a_legacy_event_with_a_message_id_is_keyed_by_it() -> None:
    """The dedupe key is message_id, else event_id, else the body's hash: legacy too."""
    [both] = parse_body(dumps({"event_type": "order.shipped", "event_id": "e", "message_id": "m"}))
    [event] = parse_body(dumps({"event_type": "order.shipped", "event_id": "e"}))
    [neither] = parse_body(dumps({"event_type": "order.shipped"}))
    assert (both.dedupe_key, event.dedupe_key) == ("m", "e")
    assert neither.dedupe_key.startswith("sha256:")


async def test_array_of_envelopes(client: Client) -> None:
    """An array of envelopes stores each one; a partly seen array is still received."""
    one = envelope("skuInventoryChange", [{"customer_identifier": "sku-1"}], "inv-1")
    two = envelope("skuInventoryChange", [{"customer_identifier": "sku-2"}], "inv-2")
    assert (await post(client, dumps([one])))[1]["status"] == "received"
    assert (await post(client, dumps([one, two])))[1]["status"] == "received"
    assert (await post(client, dumps([two, one])))[1]["status"] == "duplicate"
    assert sorted(await stored(client)) == ["inv-1", "inv-2"]


async def test_snapshot_ready_data_as_json_string(client: Client) -> None:
    """snapshotReady's data may be an object or a JSON-encoded string."""
    data = {"snapshot_id": "s", "download_url": "http://x/s.json", "snapshot_type": "full"}
    as_object = envelope("snapshotReady", data, "snap-1")
    as_string = envelope("snapshotReady", json.dumps(data), "snap-2")
    assert (await post(client, dumps(as_object)))[0] == 200
    assert (await post(client, dumps(as_string)))[0] == 200
    assert sorted(await stored(client)) == ["snap-1", "snap-2"]


async def test_message_type_from_url(client: Client) -> None:
    """POST {path}/{message_type} fills in an envelope's missing type and rejects a mismatch."""
    bare = {"message_id": "u-1", "data": [{"customer_identifier": "r1"}]}
    assert (await post(client, dumps(bare), path=f"{PATH}/rmaEvent"))[0] == 200
    store: SqlStore = client.app[RECEIVER]._store
    [message] = await store.list_messages()
    assert message.message_type == "rmaEvent"
    status, answer = await post(client, dumps(ORDER_FULFILLED), path=f"{PATH}/rmaEvent")
    assert status == 400
    assert "does not match" in answer["error"]


async def test_unsubscribed_type_ignored(make_client: Callable[..., Awaitable[Client]]) -> None:
    """A message type not subscribed is answered ignored and not stored."""
    client = await make_client(webhooks={"subscriptions": ["orderEvent"]})
    inventory = envelope("skuInventoryChange", [], "inv-x")
    assert await post(client, dumps(inventory)) == (200, {"status": "ignored"})
    assert await stored(client) == []


async def test_unknown_type_ignored(client: Client) -> None:
    """An unknown message type is answered ignored, not an error, and not stored."""
    assert await post(client, dumps(envelope("fooEvent", [], "f-1"))) == (
        200,
        {"status": "ignored"},
    )
    assert await stored(client) == []


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(dumps(ORDER_FULFILLED)[:-7], "invalid JSON", id="truncated"),
        pytest.param(b"42", "expected a JSON object or array", id="number"),
        pytest.param(b'"orderEvent"', "expected a JSON object or array", id="string"),
        pytest.param(b"null", "expected a JSON object or array", id="null"),
        pytest.param(b"[]", "no messages", id="empty-array"),
        pytest.param(b"[1, 2]", "expected an object", id="array-of-numbers"),
        pytest.param(b'{"message_id": "x", "data": []}', "no message_type", id="no-type"),
        pytest.param(b'{"message_type": "orderEvent"}', "no data", id="no-data"),
        pytest.param(
            b'{"message_type": "orderEvent", "data": 5}', "array or object", id="data-number"
        ),
        pytest.param(
            b'{"message_type": "snapshotReady", "data": "{nope"}', "not JSON", id="data-bad-str"
        ),
        pytest.param(
            b'{"message_type": "orderEvent", "data": [], "message_id": {}}',
            "message_id must be a string",
            id="id-object",
        ),
        pytest.param(b'{"event_type": 7}', "event_type", id="legacy-bad-type"),
        pytest.param(b"\xff\xfe{}", "UTF-8", id="not-utf8"),
        pytest.param(b"[" * 100_000, "", id="deep-nesting"),
    ],
)
async def test_malformed_body_is_400_and_quarantined(
    client: Client, body: bytes, reason: str
) -> None:
    """An authenticated body that is not a callback gets 400 with the reason, kept in quarantine."""
    status, answer = await post(client, body)
    assert status == 400
    assert answer["status"] == "malformed"
    assert reason in answer["error"]
    assert await stored(client) == []
    assert await quarantined(client) == [body]


async def test_unauthenticated_malformed_body_not_kept(client: Client) -> None:
    """Malformed and unsigned is 401 and leaves no trace."""
    status, _ = await post(client, b"{broken", secret=None)
    assert status == 401
    assert await quarantined(client) == []


async def test_oversized_body_413(client: Client) -> None:
    """A 2 MiB body is 413 (limit 1 MiB), stored nowhere."""
    body = b'{"message_type": "orderEvent", "data": ["' + b"x" * (2 * 1024 * 1024) + b'"]}'
    response = await client.post(
        PATH,
        data=io.BytesIO(body),
        headers={"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, SECRET)},
    )
    assert response.headers.get("Content-Length") is not None
    assert (response.status, (await response.json())["status"]) == (413, "too_large")
    assert await stored(client) == []


async def test_oversized_chunked_body_413(client: Client) -> None:
    """A body without Content-Length is cut off at the limit while reading."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    response = await client.post(
        PATH,
        data=chunks(),
        headers={"Content-Type": "application/json", "X-MasonHub-Signature": "sha256=00"},
    )
    assert response.status == 413
    assert await stored(client) == []


async def test_whole_chunked_body_over_the_limit_413(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    """A body without Content-Length that arrives whole, past a small limit, is still 413."""
    client = await make_client(server={"max_body_bytes": 1024})
    body = b'{"message_type": "orderEvent", "data": ["' + b"x" * 3000 + b'"]}'

    async def whole() -> AsyncIterator[bytes]:
        yield body

    response = await client.post(
        PATH,
        data=whole(),
        headers={"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, SECRET)},
    )
    assert (response.status, (await response.json())["status"]) == (413, "too_large")
    assert await stored(client) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_wrong_content_type_415(client: Client, content_type: str) -> None:
    """A body that is not declared JSON is 415."""
    status, answer = await post(
        client, dumps(ORDER_FULFILLED), headers={"Content-Type": content_type}
    )
    assert (status, answer["status"]) == (415, "unsupported_media_type")
    assert await stored(client) == []


async def test_json_content_type_variants(client: Client) -> None:
    """application/json with a charset, and +json types, are accepted."""
    body = dumps(ORDER_FULFILLED)
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert (await post(client, body, headers=headers))[0] == 200
    headers = {"Content-Type": "application/vnd.masonhub+json"}
    assert (await post(client, body, headers=headers))[0] == 200


# --- addresses -----------------------------------------------------------------------------


async def test_ip_allow_list(make_client: Callable[..., Awaitable[Client]]) -> None:
    """A caller outside webhooks.allowed_ips is 403 before anything else; inside is served."""
    client = await make_client(webhooks={"allowed_ips": ["10.1.0.0/16"]})
    status, answer = await post(client, dumps(ORDER_FULFILLED))
    assert (status, answer["status"]) == (403, "forbidden")
    client2 = await make_client(webhooks={"allowed_ips": ["127.0.0.0/8"]})
    assert (await post(client2, dumps(ORDER_FULFILLED)))[0] == 200


async def test_forwarded_for_believed_only_from_trusted_proxies(
    make_client: Callable[..., Awaitable[Client]],
) -> None:
    """X-Forwarded-For names the caller only when the peer is a trusted proxy."""
    body = dumps(ORDER_FULFILLED)
    spoof = {"X-Forwarded-For": "10.1.2.3"}
    untrusting = await make_client(webhooks={"allowed_ips": ["10.1.0.0/16"]})
    assert (await post(untrusting, body, headers=spoof))[0] == 403
    trusting = await make_client(
        webhooks={"allowed_ips": ["10.1.0.0/16"]}, server={"trusted_proxies": ["127.0.0.1/32"]}
    )
    assert (await post(trusting, body, headers=spoof))[0] == 200
    chain = {"X-Forwarded-For": "10.1.2.3, 192.0.2.9"}
    assert (await post(trusting, body, headers=chain))[0] == 403
    assert (await post(trusting, body, headers={"X-Forwarded-For": "junk"}))[0] == 403


# --- store down ----------------------------------------------------------------------------


async def test_sqlite_locked_store_503(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    """While the SQLite file cannot be written, callbacks get 503, never 200; then 200 again."""
    path = tmp_path / "s.db"
    url = f"sqlite+aiosqlite:///{path}?timeout=0.2"
    client = await aiohttp_client(
        create_app(make_settings(url, store={"auto_migrate": True}), adapter=RecordingErp())
    )
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        status, answer = await post(client, dumps(ORDER_FULFILLED))
        assert (status, answer["status"]) == (503, "unavailable")
        assert (await post(client, b"{bad"))[0] == 503
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await post(client, dumps(ORDER_FULFILLED)) == (200, {"status": "received"})


@pytest.mark.postgres
async def test_postgres_down_503(aiohttp_client: ClientFactory, pg_migrated_url: str) -> None:
    """With PostgreSQL unreachable, callbacks and readyz get 503; both recover without a restart."""
    url = make_url(pg_migrated_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        client = await aiohttp_client(create_app(make_settings(proxied), adapter=RecordingErp()))
        admin = await aiohttp_client(create_admin_app(client.app))
        await proxy.cut()
        assert (await post(client, dumps(ORDER_FULFILLED)))[0] == 503
        assert (await admin.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200
        await proxy.restore()
        assert await post(client, dumps(ORDER_FULFILLED)) == (200, {"status": "received"})
        assert (await admin.get("/readyz")).status == 200
    finally:
        await proxy.cut()
        from tests.conftest import _truncate

        await _truncate(pg_migrated_url)


async def test_draining_answers_503(client: Client) -> None:
    """While the daemon stops, new callbacks get 503 so MasonHub sends them again."""
    client.app[RECEIVER].draining = True
    assert (await post(client, dumps(ORDER_FULFILLED)))[0] == 503
    assert await stored(client) == []


# --- health and logs -----------------------------------------------------------------------


async def test_health_endpoints(client: Client, aiohttp_client: ClientFactory) -> None:
    """healthz says the process is alive; readyz, on the admin listener, that the store is
    migrated and reachable. The public port serves neither readyz nor the admin pages."""
    admin = await aiohttp_client(create_admin_app(client.app))
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    assert await (await admin.get("/healthz")).json() == {"status": "ok"}
    assert await (await admin.get("/readyz")).json() == {"status": "ready"}
    for path in ("/readyz", "/metrics", "/status"):
        assert (await client.get(path)).status == 404


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """syncd's JSON logging, captured; structlog's defaults restored afterwards."""
    stream = io.StringIO()
    configure_logging(secrets=[SECRET], stream=stream, cache=False)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def test_logs_one_line_per_request_without_secrets(
    client: Client, json_logs: io.StringIO
) -> None:
    """Each request logs one JSON line with type, id, outcome and latency, and no secret."""
    stream = json_logs
    body = dumps(ORDER_FULFILLED)
    signature = sign(body, SECRET)
    await post(client, body)
    await post(client, body, secret="wrong-secret")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    accepted = [line for line in lines if line["event"] == "webhook.accepted"]
    rejected = [line for line in lines if line["event"] == "webhook.rejected"]
    assert len(accepted) == 1
    assert len(rejected) == 1
    assert accepted[0]["message_type"] == "orderEvent"
    assert accepted[0]["message_id"] == ORDER_FULFILLED["message_id"]
    assert accepted[0]["outcome"] == "received"
    assert isinstance(accepted[0]["latency_ms"], float)
    assert rejected[0]["status"] == 401
    text = stream.getvalue()
    assert SECRET not in text
    assert signature.removeprefix("sha256=") not in text
    assert "1Z999" not in text


async def test_prune_job_scheduled(client: Client) -> None:
    """The running daemon schedules the inbox prune with one instance at a time."""
    from syncd.app import SCHEDULER

    job = client.app[SCHEDULER].get_job("prune_inbox")
    assert job is not None
    assert (job.max_instances, job.coalesce) == (1, True)


# --- slow clients -----------------------------------------------------------------------------


async def test_a_body_trickled_slower_than_the_timeout_is_answered_408(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that takes longer than BODY_TIMEOUT to send its body gets 408 and nothing is
    stored: a trickling client cannot hold a request (or the shutdown drain) open."""
    monkeypatch.setattr("syncd.receiver.BODY_TIMEOUT", 0.3)
    body = dumps(ORDER_FULFILLED)

    async def trickle() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 20):
            yield body[start : start + 20]
            await asyncio.sleep(0.1)

    headers = {"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, SECRET)}
    response = await client.post(PATH, data=trickle(), headers=headers)
    assert response.status == 408
    assert (await response.json())["status"] == "timeout"
    assert await stored(client) == []


async def test_a_connection_that_never_finishes_its_headers_is_closed(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's listener closes a connection whose request head never completes after
    KEEPALIVE_TIMEOUT (aiohttp's default would hold it for an hour)."""
    from syncd.app import serve
    from tests.test_cli import free_port

    monkeypatch.setattr("syncd.app.KEEPALIVE_TIMEOUT", 0.5)
    port = free_port()
    settings = make_settings(
        store_url,
        server={"host": "127.0.0.1", "port": port},
        admin={"host": "127.0.0.1", "port": free_port()},
    )
    stop = asyncio.Event()
    daemon = asyncio.create_task(serve(settings, stop))
    try:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        writer.write(b"POST /webhooks/masonhub HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the server, no answer
        writer.close()
    finally:
        stop.set()
        await daemon
