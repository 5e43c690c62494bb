"""The `http` ERP adapter: requests it makes, how it classifies answers, retries, timeouts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from importlib.metadata import EntryPoint
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from aioresponses.core import RequestCall
from structlog.typing import EventDict
from yarl import URL

import syncd.erp
import syncd.erp.http
from syncd.config import ErpSettings, settings_from_dict
from syncd.erp import Delivery, load_adapter
from syncd.erp.http import HttpErpAdapter, parse_retry_after
from syncd.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError

ServerFactory = Callable[..., Awaitable[TestServer]]

BASE = "http://erp.test/api"
TOKEN = "erp-token-s3cret"
PAYLOAD = {"status": "fulfilled", "shipments": [{"tracking_number": "1Z999", "qty": 2}]}
COMPACT = b'{"status":"fulfilled","shipments":[{"tracking_number":"1Z999","qty":2}]}'


def erp_settings(**erp: Any) -> ErpSettings:
    raw = {"erp": {"base_url": BASE, "token": TOKEN, **erp}, "webhooks": {"signing_secrets": ["x"]}}
    return settings_from_dict(raw, environ={}).erp


def delivery(entity_type: str = "order", entity_key: str = "129374", **fields: Any) -> Delivery:
    values: dict[str, Any] = {
        "payload": PAYLOAD,
        "idempotency_key": "order:129374:v3",
        "source": "webhook",
        **fields,
    }
    return Delivery(entity_type=entity_type, entity_key=entity_key, **values)


def calls(mocked: aioresponses, url: str) -> list[RequestCall]:
    return mocked.requests.get(("PUT", URL(url)), [])


@pytest.fixture
async def adapter() -> AsyncIterator[HttpErpAdapter]:
    """An http adapter with a token, closed after the test."""
    erp = HttpErpAdapter(erp_settings())
    yield erp
    await erp.close()


@pytest.fixture
def retry_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EventDict]]:
    """The adapter's log lines; a fresh logger so no earlier configuration cached it."""
    monkeypatch.setattr(syncd.erp.http, "log", structlog.get_logger("test"))
    with structlog.testing.capture_logs() as entries:
        yield entries


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity_type", "path"),
    [
        ("order", "/orders/129374"),
        ("inventory", "/inventory/129374"),
        ("inbound_shipment", "/inbound-shipments/129374"),
        ("return", "/returns/129374"),
        ("order_request", "/order-requests/129374"),
    ],
)
async def test_put_per_entity_type(
    mocked: aioresponses, adapter: HttpErpAdapter, entity_type: str, path: str
) -> None:
    """Each entity type is PUT to its path with the contract's headers and compact JSON."""
    mocked.put(BASE + path, status=200)

    result = await adapter.deliver(delivery(entity_type, source="poll"))

    assert result.status == 200
    [call] = calls(mocked, BASE + path)
    assert call.kwargs["headers"] == {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "Idempotency-Key": "order:129374:v3",
        "X-Syncd-Source": "poll",
    }
    assert call.kwargs["data"] == COMPACT
    assert call.kwargs["allow_redirects"] is False
    assert call.kwargs["timeout"].total == 15.0


async def test_entity_key_is_one_quoted_segment(
    mocked: aioresponses, adapter: HttpErpAdapter
) -> None:
    """An identifier with "/", spaces and "%" is quoted into a single path segment."""
    url = BASE + "/orders/A%2FB%2012%25"
    mocked.put(url, status=204)

    await adapter.deliver(delivery(entity_key="A/B 12%"))

    assert len(calls(mocked, url)) == 1


async def test_paths_override(mocked: aioresponses) -> None:
    """An [erp.paths] entry replaces that entity's path; the others keep their default."""
    erp = HttpErpAdapter(erp_settings(paths={"orders": "/v2/sales-orders/{id}/state"}))
    mocked.put(BASE + "/v2/sales-orders/7/state", status=200)
    mocked.put(BASE + "/returns/7", status=200)
    try:
        await erp.deliver(delivery("order", "7"))
        await erp.deliver(delivery("return", "7"))
    finally:
        await erp.close()

    assert len(calls(mocked, BASE + "/v2/sales-orders/7/state")) == 1
    assert len(calls(mocked, BASE + "/returns/7")) == 1


async def test_no_authorization_without_token(mocked: aioresponses) -> None:
    """With an empty erp.token no Authorization header is sent at all."""
    erp = HttpErpAdapter(erp_settings(token=""))
    mocked.put(BASE + "/orders/129374", status=200)
    try:
        await erp.deliver(delivery())
    finally:
        await erp.close()

    [call] = calls(mocked, BASE + "/orders/129374")
    assert "Authorization" not in call.kwargs["headers"]


@pytest.mark.parametrize("replay", [False, True])
async def test_replay_header_only_on_replay(
    mocked: aioresponses, adapter: HttpErpAdapter, replay: bool
) -> None:
    """X-Syncd-Replay: true is sent for a replayed delivery and absent otherwise."""
    mocked.put(BASE + "/orders/129374", status=200)

    await adapter.deliver(delivery(replay=replay))

    [call] = calls(mocked, BASE + "/orders/129374")
    assert call.kwargs["headers"].get("X-Syncd-Replay") == ("true" if replay else None)


async def test_any_mapping_payload_is_sent(mocked: aioresponses, adapter: HttpErpAdapter) -> None:
    """A payload made of read-only mappings is serialised like the equivalent dicts."""
    mocked.put(BASE + "/orders/129374", status=200)
    payload = MappingProxyType({"lines": [MappingProxyType({"sku": "é"})]})

    await adapter.deliver(delivery(payload=payload))

    [call] = calls(mocked, BASE + "/orders/129374")
    assert call.kwargs["data"] == '{"lines":[{"sku":"é"}]}'.encode()


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_2xx_is_delivered(mocked: aioresponses, adapter: HttpErpAdapter, status: int) -> None:
    """Any 2xx answer is a DeliveryResult with that status and the time taken."""
    mocked.put(BASE + "/orders/129374", status=status, body='{"ok":true}')

    result = await adapter.deliver(delivery())

    assert result.status == status
    assert 0 <= result.elapsed < 5


# --- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, "ERP answered 500 Internal Server Error"),
        (502, "ERP answered 502 Bad Gateway"),
        (503, "ERP answered 503 Service Unavailable"),
        (504, "ERP answered 504 Gateway Timeout"),
        (408, "ERP answered 408 Request Timeout"),
        (425, "ERP answered 425 Too Early"),
        (429, "ERP answered 429 Too Many Requests"),
    ],
)
async def test_transient_statuses(
    mocked: aioresponses, adapter: HttpErpAdapter, status: int, message: str
) -> None:
    """408, 425, 429 and 5xx raise TransientDeliveryError with the status, once, no retry;
    only a gateway's 502 and 504 say the ERP behind it may still apply the request."""
    mocked.put(BASE + "/orders/129374", status=status, body=" busy \n")

    with pytest.raises(TransientDeliveryError) as caught:
        await adapter.deliver(delivery())

    assert caught.value.status == status
    assert caught.value.message == message
    assert caught.value.body == "busy"
    assert caught.value.retry_after is None
    assert caught.value.uncertain is (status in (502, 504))
    assert len(calls(mocked, BASE + "/orders/129374")) == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2", 2.0), (" 120 ", 120.0), ("-3", 0.0), ("soon", None), ("", None), ("1e9999", None)],
)
async def test_retry_after_seconds(
    mocked: aioresponses, adapter: HttpErpAdapter, header: str, expected: float | None
) -> None:
    """Retry-After delta-seconds become retry_after; negative is 0 and garbage is None."""
    mocked.put(BASE + "/orders/129374", status=429, headers={"Retry-After": header})

    with pytest.raises(TransientDeliveryError) as caught:
        await adapter.deliver(delivery())

    assert caught.value.retry_after == expected


async def test_retry_after_http_date(mocked: aioresponses, adapter: HttpErpAdapter) -> None:
    """A Retry-After HTTP-date becomes the number of seconds from now until then."""
    when = datetime.now(UTC) + timedelta(seconds=90)
    mocked.put(
        BASE + "/orders/129374", status=503, headers={"Retry-After": format_datetime(when, True)}
    )

    with pytest.raises(TransientDeliveryError) as caught:
        await adapter.deliver(delivery())

    assert caught.value.retry_after == pytest.approx(90, abs=2)


def test_retry_after_date_in_the_past() -> None:
    """A Retry-After date already past means retry now (0), not a negative delay."""
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("Wed, 01 May 2024 11:59:00 GMT", now=now) == 0.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now=now) == 30.0


@pytest.mark.parametrize("status", [400, 404, 409, 422, 301])
async def test_permanent_statuses(
    mocked: aioresponses, adapter: HttpErpAdapter, status: int
) -> None:
    """Other 4xx and 3xx raise PermanentDeliveryError with the body excerpt; no redirect."""
    mocked.put(
        BASE + "/orders/129374",
        status=status,
        body='{"error":"unknown sku ABC"}',
        headers={"Location": BASE + "/elsewhere"},
    )

    with pytest.raises(PermanentDeliveryError) as caught:
        await adapter.deliver(delivery())

    assert caught.value.status == status
    assert caught.value.message.startswith(f"ERP answered {status} ")
    assert caught.value.body == '{"error":"unknown sku ABC"}'
    assert calls(mocked, BASE + "/elsewhere") == []


async def test_body_excerpt_is_bounded_text(mocked: aioresponses, adapter: HttpErpAdapter) -> None:
    """A huge, partly non-UTF-8 error body becomes at most 500 characters of text."""
    mocked.put(BASE + "/orders/129374", status=422, body=b"\xff" + b"x" * 100_000)

    with pytest.raises(PermanentDeliveryError) as caught:
        await adapter.deliver(delivery())

    assert caught.value.body == "\ufffd" + "x" * 499


async def test_unknown_entity_type_is_permanent(
    mocked: aioresponses, adapter: HttpErpAdapter
) -> None:
    """An entity type without an ERP path is refused without any request."""
    with pytest.raises(PermanentDeliveryError, match="no ERP path for entity type 'widget'"):
        await adapter.deliver(delivery("widget"))

    assert mocked.requests == {}


# --- connection failures and timeouts -------------------------------------------------------


async def test_connection_error_twice_then_delivered(
    mocked: aioresponses, adapter: HttpErpAdapter, retry_logs: list[EventDict]
) -> None:
    """Two connection failures are retried after short jittered waits and the third succeeds."""
    url = BASE + "/orders/129374"
    mocked.put(url, exception=aiohttp.ServerDisconnectedError())
    mocked.put(url, exception=aiohttp.ClientOSError(104, "Connection reset by peer"))
    mocked.put(url, status=204)

    result = await adapter.deliver(delivery())

    assert result.status == 204
    assert len(calls(mocked, url)) == 3
    assert [(e["event"], e["attempt"]) for e in retry_logs] == [
        ("erp.connection_retry", 1),
        ("erp.connection_retry", 2),
    ]
    assert 0.1 <= retry_logs[0]["wait"] <= 0.2
    assert 0.2 <= retry_logs[1]["wait"] <= 0.3
    assert "Server disconnected" in retry_logs[0]["error"]


async def test_connection_error_three_times_is_transient(
    mocked: aioresponses, adapter: HttpErpAdapter, retry_logs: list[EventDict]
) -> None:
    """Three connection failures raise TransientDeliveryError, never showing the token."""
    url = BASE + "/orders/129374"
    failure = aiohttp.ClientOSError(104, f"reset ({TOKEN})")
    mocked.put(url, exception=failure, repeat=True)

    with pytest.raises(TransientDeliveryError) as caught:
        await adapter.deliver(delivery())

    assert caught.value.message == "connection to ERP lost: [Errno 104] reset ([redacted])"
    assert caught.value.uncertain  # the request may have been read before the reset
    assert caught.value.status is None
    assert len(calls(mocked, url)) == 3
    assert len(retry_logs) == 2
    assert TOKEN not in repr(retry_logs)


@pytest.mark.parametrize("failure", [TimeoutError(), aiohttp.ServerTimeoutError("read timed out")])
async def test_timeout_is_transient_and_not_retried(
    mocked: aioresponses, adapter: HttpErpAdapter, failure: Exception
) -> None:
    """A timeout raises TransientDeliveryError at once: it is not a connection retry."""
    url = BASE + "/orders/129374"
    mocked.put(url, exception=failure, repeat=True)

    with pytest.raises(TransientDeliveryError, match=r"^ERP timed out after 15s$") as caught:
        await adapter.deliver(delivery())

    assert caught.value.uncertain
    assert len(calls(mocked, url)) == 1


async def test_closed_adapter_refuses_transiently() -> None:
    """A delivery after close() fails as transient, so it is retried after the restart."""
    erp = HttpErpAdapter(erp_settings())
    await erp.close()

    with pytest.raises(TransientDeliveryError, match="closed"):
        await erp.deliver(delivery())


# --- a real local ERP -----------------------------------------------------------------------


class FakeErp:
    """A local ERP app recording what it received, optionally stalling until released."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.stall = False
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "body": body,
                "peer": request.transport.get_extra_info("peername") if request.transport else None,
            }
        )
        if self.stall:
            await asyncio.wait_for(self.release.wait(), timeout=10)
        return web.json_response({"accepted": True}, status=201)


@pytest.fixture
async def fake_erp(aiohttp_server: ServerFactory) -> AsyncIterator[tuple[FakeErp, ErpSettings]]:
    """A FakeErp on an ephemeral port and settings pointing at it (200 ms timeout)."""
    erp = FakeErp()
    app = web.Application()
    app.router.add_put("/api/{tail:.*}", erp.handle)
    server = await aiohttp_server(app)
    yield erp, erp_settings(base_url=str(server.make_url("/api")), timeout="200ms")
    erp.release.set()


async def test_real_server_receives_exact_request(fake_erp: tuple[FakeErp, ErpSettings]) -> None:
    """A real ERP sees the PUT, the quoted path, the contract headers and the JSON body."""
    erp, settings = fake_erp
    adapter = HttpErpAdapter(settings)
    try:
        result = await adapter.deliver(delivery("inventory", "SKU 1/2", source="reconcile"))
    finally:
        await adapter.close()

    assert result.status == 201
    [seen] = erp.requests
    assert seen["method"] == "PUT"
    assert seen["raw_path"] == "/api/inventory/SKU%201%2F2"
    assert seen["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["Idempotency-Key"] == "order:129374:v3"
    assert seen["headers"]["X-Syncd-Source"] == "reconcile"
    assert "X-Syncd-Replay" not in seen["headers"]
    assert seen["body"] == COMPACT
    assert json.loads(seen["body"]) == PAYLOAD


async def test_real_server_too_slow_times_out(fake_erp: tuple[FakeErp, ErpSettings]) -> None:
    """An ERP slower than erp.timeout yields TransientDeliveryError soon after the timeout."""
    erp, settings = fake_erp
    erp.stall = True
    adapter = HttpErpAdapter(settings)
    started = time.monotonic()
    try:
        with pytest.raises(TransientDeliveryError, match=r"^ERP timed out after 0\.2s$") as caught:
            await adapter.deliver(delivery())
    finally:
        await adapter.close()

    assert time.monotonic() - started < 2
    assert len(erp.requests) == 1
    assert caught.value.uncertain  # the ERP has the request and may still apply it


async def test_real_refused_connection_is_certain(unused_tcp_port: int) -> None:
    """Nothing listening: three connects fail, and nothing can have reached the ERP."""
    adapter = HttpErpAdapter(erp_settings(base_url=f"http://127.0.0.1:{unused_tcp_port}/api"))
    try:
        with pytest.raises(TransientDeliveryError) as caught:
            await adapter.deliver(delivery())
    finally:
        await adapter.close()

    assert caught.value.message.startswith("cannot connect to ERP: ")
    assert not caught.value.uncertain


async def test_real_connection_dropped_after_the_request_is_uncertain(
    aiohttp_server: ServerFactory,
) -> None:
    """An ERP that reads the whole request and then drops the connection may have applied it."""
    received: list[bytes] = []

    async def drop(request: web.Request) -> web.Response:
        received.append(await request.read())
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    app = web.Application()
    app.router.add_put("/api/{tail:.*}", drop)
    server = await aiohttp_server(app)
    adapter = HttpErpAdapter(erp_settings(base_url=str(server.make_url("/api"))))
    try:
        with pytest.raises(TransientDeliveryError) as caught:
            await adapter.deliver(delivery())
    finally:
        await adapter.close()

    # Retried in the call (the PUT is idempotent); aiohttp may itself resend on a fresh socket.
    assert len(received) >= 3
    assert set(received) == {COMPACT}
    assert caught.value.message.startswith("connection to ERP lost: ")
    assert caught.value.uncertain


async def test_real_server_session_is_reused(fake_erp: tuple[FakeErp, ErpSettings]) -> None:
    """Consecutive deliveries share one kept-alive connection to the ERP."""
    erp, settings = fake_erp
    adapter = HttpErpAdapter(settings)
    try:
        await adapter.deliver(delivery("order", "1"))
        await adapter.deliver(delivery("return", "2"))
    finally:
        await adapter.close()

    first, second = erp.requests
    assert first["peer"] is not None
    assert first["peer"] == second["peer"]


# --- load_adapter ---------------------------------------------------------------------------


async def test_load_adapter_http() -> None:
    """erp.adapter = "http" resolves through the entry point to HttpErpAdapter."""
    adapter = load_adapter(erp_settings())
    try:
        assert isinstance(adapter, HttpErpAdapter)
    finally:
        await adapter.close()


def test_load_adapter_unknown() -> None:
    """An unknown adapter name is a ConfigError on erp.adapter listing those installed."""
    with pytest.raises(ConfigError) as caught:
        load_adapter(erp_settings(adapter="sap"))

    assert caught.value.key == "erp.adapter"
    assert caught.value.problem.startswith("unknown adapter 'sap' (installed: ")
    assert "http" in caught.value.problem


def broken_factory(settings: ErpSettings) -> HttpErpAdapter:
    raise RuntimeError("no licence for this ERP")


def test_load_adapter_factory_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A factory that raises is a ConfigError on erp.adapter carrying the reason."""
    entry = EntryPoint("broken", f"{__name__}:broken_factory", syncd.erp.ENTRY_POINT_GROUP)
    monkeypatch.setattr(syncd.erp, "entry_points", lambda **_: [entry])

    with pytest.raises(ConfigError) as caught:
        load_adapter(erp_settings(adapter="broken"))

    assert caught.value.key == "erp.adapter"
    assert caught.value.problem == "adapter 'broken' failed to start: no licence for this ERP"
