"""End to end on real servers: signed callbacks in, idempotent PUTs to a local ERP out."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from syncd.app import DELIVERER, STORE, create_app
from syncd.config import ErpSettings
from syncd.delivery import Deliverer
from syncd.errors import TransientDeliveryError
from syncd.logs import configure_logging
from syncd.store import ClaimedDelivery, OutboxState, SqlStore
from syncd.testing import ErpCall, LocalErp, dumps, envelope, sign
from tests.conftest import SECRET, make_settings

Client = TestClient[web.Request, web.Application]
PATH = "/webhooks/masonhub"


class Harness:
    """syncd and a local ERP, each on its own real server."""

    def __init__(self, client: Client, erp: LocalErp) -> None:
        self.client = client
        self.erp = erp
        self.store: SqlStore = client.app[STORE]

    async def send(self, document: Any) -> tuple[int, dict[str, Any]]:
        body = dumps(document)
        response = await self.client.post(
            PATH,
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-MasonHub-Signature": sign(body, SECRET),
            },
        )
        return response.status, await response.json()

    async def settled(self, within: float = 10.0) -> None:
        """Wait until the inbox is merged and nothing is pending delivery."""
        async with asyncio.timeout(within):
            while True:
                # Messages first: once they are merged, the outbox read after them is complete.
                messages = await self.store.list_messages(limit=1000)
                merged = all(m.state != "pending" for m in messages)
                counts = await self.store.outbox_counts()
                if merged and not counts.get(OutboxState.PENDING.value):
                    return
                await asyncio.sleep(0.02)


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
def harness(
    store_url: str,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> HarnessFactory:
    """Start a local ERP and syncd pointed at it, with fast retries for tests."""

    async def make(**erp_settings: Any) -> Harness:
        erp = LocalErp()
        server = await aiohttp_server(erp.app())
        erp_config = {
            "base_url": str(server.make_url("/api")),
            "token": "erp-secret-token",
            "timeout": "2s",
            "backoff_initial": "100ms",
            "backoff_max": "500ms",
            "max_attempts": 5,
            "concurrency": 4,
            **erp_settings,
        }
        app = create_app(make_settings(store_url, erp=erp_config))
        return Harness(await aiohttp_client(app), erp)

    return make


def order(
    key: str, status: str, *tracking: str, message_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    shipments = [
        {"shipment_id": f"{key}-s{i}", "tracking_number": number, "shipping_provider": "UPS"}
        for i, number in enumerate(tracking, 1)
    ]
    item = {"id": f"mh-{key}", "customer_identifier": key, "status": status, **extra}
    if tracking:
        item["shipments"] = shipments
    return envelope("orderEvent", [item], message_id or f"{key}-{status}-{len(tracking)}")


def inventory(sku: str, available: int, as_of: str, message_id: str) -> dict[str, Any]:
    item = {
        "customer_identifier": sku,
        "sku_id": f"mh-{sku}",
        "total_units": available + 5,
        "total_available_to_sell": available,
        "as_of": as_of,
        "status_counts": [
            {"inventory_status": "available", "quantity": available},
            {"inventory_status": "damaged", "quantity": 5},
        ],
    }
    return envelope("skuInventoryChange", [item], message_id)


async def test_fulfilled_order_reaches_erp_once_with_both_tracking_numbers(
    harness: HarnessFactory,
) -> None:
    """A fulfilled orderEvent with two shipments makes exactly one PUT with both numbers."""
    h = await harness()
    message = order("129374", "fulfilled", "1Z001", "1Z002")
    assert await h.send(message) == (200, {"status": "received"})
    await h.settled()
    assert await h.send(message) == (200, {"status": "duplicate"})
    await h.settled()
    [call] = h.erp.calls_to("/api/orders/129374")
    assert [s["tracking_number"] for s in call.body["shipments"]] == ["1Z001", "1Z002"]
    assert call.body["status"] == "fulfilled"
    assert call.headers["Authorization"] == "Bearer erp-secret-token"
    assert call.headers["X-Syncd-Source"] == "webhook"
    assert call.headers["Idempotency-Key"] == "order:129374:r1"


async def test_a_huge_integer_reaches_the_erp_exactly(harness: HarnessFactory) -> None:
    """An integer beyond 64 bits in an order is delivered as that integer, not a float."""
    h = await harness()
    huge = 123456789012345678901234567890
    await h.send(order("BIG-1", "packed", id=huge))
    await h.settled()
    await h.send(order("BIG-1", "fulfilled", "1ZB", id=huge))
    await h.settled()
    calls = h.erp.calls_to("/api/orders/BIG-1")
    assert [c.body["status"] for c in calls] == ["packed", "fulfilled"]
    assert [c.body["masonhub_id"] for c in calls] == [huge, huge]


async def test_a_webhook_logs_one_line_in_and_one_line_out(harness: HarnessFactory) -> None:
    """Received and delivered, a webhook leaves one line for each, naming it, with no
    secret: what an operator greps for when an order is asked about."""
    out = io.StringIO()
    configure_logging(secrets=[SECRET, "erp-secret-token"], stream=out, cache=False)
    try:
        h = await harness()
        await h.send(order("LOG-1", "fulfilled", "1ZLOG"))
        await h.settled()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    [received] = [line for line in lines if line["event"] == "webhook.accepted"]
    [delivered] = [line for line in lines if line["event"] == "delivery.delivered"]
    assert received["message_id"] == "LOG-1-fulfilled-1"
    assert received["outcome"] == "received"
    assert delivered["entity_type"] == "order"
    assert delivered["entity_key"] == "LOG-1"
    assert delivered["idempotency_key"] == "order:LOG-1:r1"
    assert (delivered["status"], delivered["attempt"], delivered["source"]) == (200, 1, "webhook")
    assert delivered["level"] == "info"
    assert isinstance(delivered["latency_ms"], float)
    assert "erp-secret-token" not in out.getvalue()


async def test_late_packed_never_follows_fulfilled(harness: HarnessFactory) -> None:
    """fulfilled, then a late packed: the ERP never sees packed after fulfilled."""
    h = await harness()
    await h.send(order("A-1", "fulfilled", "1Z9"))
    await h.settled()
    await h.send(order("A-1", "packed"))
    await h.settled()
    statuses = [c.body["status"] for c in h.erp.calls_to("/api/orders/A-1")]
    assert statuses == ["fulfilled"]
    [event] = await h.store.list_events(limit=1)
    [fact] = await h.store.facts_of(event.id)
    assert (fact.outcome, fact.reason) == ("stale", "older lifecycle status")


async def test_same_state_from_poll_makes_no_second_call(harness: HarnessFactory) -> None:
    """A poll that finds the state a webhook already delivered makes no ERP call."""
    from syncd.facts import order_fact

    h = await harness()
    await h.send(order("P-1", "fulfilled", "1ZP"))
    await h.settled()
    polled = {
        "id": "mh-P-1",
        "customer_identifier": "P-1",
        "status": "fulfilled",
        "updated_at": "2026-12-03T10:00:00Z",
        "shipments": [
            {"shipment_id": "P-1-s1", "tracking_number": "1ZP", "shipping_provider": "UPS"}
        ],
    }
    result = await h.store.apply_facts([order_fact(polled, "poll")])
    assert result.queued == 0
    assert [d.outcome.value for d in result.decisions] == ["unchanged"]
    await h.settled()
    assert len(h.erp.calls_to("/api/orders/P-1")) == 1


async def test_later_event_without_shipments_keeps_tracking_numbers(
    harness: HarnessFactory,
) -> None:
    """A carrier-stage event that omits shipments still PUTs the known tracking numbers."""
    h = await harness()
    await h.send(order("T-1", "fulfilled", "1ZT1"))
    await h.settled()
    await h.send(order("T-1", "inTransit"))
    await h.settled()
    calls = h.erp.calls_to("/api/orders/T-1")
    assert [c.body["status"] for c in calls] == ["fulfilled", "in_transit"]
    assert calls[-1].body["shipments"][0]["tracking_number"] == "1ZT1"
    assert calls[-1].headers["Idempotency-Key"] == "order:T-1:r2"


async def test_inventory_coalesces_under_slow_erp(harness: HarnessFactory) -> None:
    """Five quick changes to one SKU while the ERP is slow become at most two calls."""
    h = await harness()

    async def slow(_call: ErpCall) -> None:
        await asyncio.sleep(0.4)

    h.erp.respond = slow
    for i in range(5):
        await h.send(inventory("SKU-1", 100 - i, f"2026-12-03T10:00:0{i}Z", f"inv-{i}"))
    await h.settled()
    calls = h.erp.calls_to("/api/inventory/SKU-1")
    assert 1 <= len(calls) <= 2
    assert calls[-1].body["total_available_to_sell"] == 96
    assert calls[-1].body["counts_by_status"] == {"available": 96, "damaged": 5}


async def test_per_entity_order_with_concurrency(harness: HarnessFactory) -> None:
    """With 8 workers and a jittery ERP, no entity has two calls at once and each ends latest."""
    h = await harness(concurrency=8)
    rng = random.Random(7)

    async def jitter(_call: ErpCall) -> None:
        await asyncio.sleep(rng.uniform(0, 0.05))

    h.erp.respond = jitter
    statuses = ["at_warehouse", "in_process", "packed", "fulfilled"]
    for status in statuses:
        await asyncio.gather(
            *(
                h.send(order(f"O-{n}", status, *(["1Z"] if status == "fulfilled" else [])))
                for n in range(10)
            )
        )
    await h.settled(within=20)
    assert h.erp.max_concurrent_per_path == 1
    for n in range(10):
        seen = [c.body["status"] for c in h.erp.calls_to(f"/api/orders/O-{n}")]
        assert seen[-1] == "fulfilled"
        assert seen == sorted(seen, key=statuses.index)


async def test_erp_outage_then_recovery_delivers_once(harness: HarnessFactory) -> None:
    """The ERP answers 503 three times, then recovers: one delivery, four attempts recorded."""
    h = await harness()
    failures = 3

    async def flaky(_call: ErpCall) -> web.Response | None:
        nonlocal failures
        if failures:
            failures -= 1
            return web.json_response({"error": "down"}, status=503)
        return None

    h.erp.respond = flaky
    await h.send(order("R-1", "fulfilled", "1ZR"))
    await h.settled()
    calls = h.erp.calls_to("/api/orders/R-1")
    assert len(calls) == 4
    assert len({c.headers["Idempotency-Key"] for c in calls}) == 1
    assert h.erp.records["/api/orders/R-1"]["shipments"][0]["tracking_number"] == "1ZR"
    entity = await h.store.get_entity("order", "R-1")
    assert entity is not None
    attempts = await h.store.attempts_of(entity.id)
    assert [a.outcome for a in attempts] == ["transient"] * 3 + ["delivered"]
    assert [a.status_code for a in attempts] == [503, 503, 503, 200]


async def test_retry_after_is_honoured(harness: HarnessFactory) -> None:
    """A 429 with Retry-After: 2 is retried no sooner than two seconds later."""
    h = await harness()
    answered = False

    async def throttle(_call: ErpCall) -> web.Response | None:
        nonlocal answered
        if not answered:
            answered = True
            return web.json_response({}, status=429, headers={"Retry-After": "2"})
        return None

    h.erp.respond = throttle
    await h.send(order("RA-1", "packed"))
    await h.settled(within=15)
    first, second = h.erp.calls_to("/api/orders/RA-1")
    assert second.at - first.at >= 1.9


async def test_late_effect_of_a_timed_out_call_never_overwrites_a_newer_state(
    harness: HarnessFactory,
) -> None:
    """The ERP applies a call after syncd stopped waiting for it. The newer state queued
    meanwhile goes out only after that late effect, so the ERP ends with the newer state."""
    h = await harness(timeout="500ms", backoff_initial="20ms", backoff_max="50ms")
    late_effects: list[asyncio.Task[None]] = []

    async def take_effect_late(call: ErpCall) -> None:
        await asyncio.sleep(0.8)  # syncd gave up waiting at 0.5 s
        h.erp.records[call.path] = call.body

    async def first_call_lands_late(call: ErpCall) -> web.Response | None:
        if len(h.erp.calls) > 1:
            return None
        # The test server cancels a handler whose client left; the ERP's work goes on anyway.
        late_effects.append(asyncio.create_task(take_effect_late(call)))
        await asyncio.sleep(5)
        return web.json_response({"ok": True})

    h.erp.respond = first_call_lands_late
    await h.send(order("LATE-1", "packed"))
    await h.erp.wait_for(lambda: len(h.erp.calls) == 1)
    await h.send(order("LATE-1", "fulfilled", "1ZLATE"))
    await h.settled()
    await asyncio.wait_for(late_effects[0], 5)

    first, second = h.erp.calls_to("/api/orders/LATE-1")
    assert (first.body["status"], second.body["status"]) == ("packed", "fulfilled")
    assert second.at - first.at >= 0.5 + 0.5  # its timeout, then as long again
    record = h.erp.records["/api/orders/LATE-1"]
    assert record["status"] == "fulfilled"
    assert record["shipments"][0]["tracking_number"] == "1ZLATE"


def test_retry_after_an_uncertain_failure_waits_at_least_the_timeout() -> None:
    """A failure the ERP may still apply is retried no sooner than erp.timeout, even when the
    backoff or a Retry-After is shorter; other transient failures keep their schedule."""
    settings = ErpSettings(timeout=5, backoff_initial=0.1, backoff_max=0.2)
    idle_store = SimpleNamespace(complete_deliveries=None)  # verdict reads no store
    deliverer = Deliverer(idle_store, None, settings)  # type: ignore[arg-type]
    claim = ClaimedDelivery(1, 1, "order", "O-1", {}, "h", 1, "webhook", 0, 0)

    def wait(exc: TransientDeliveryError) -> float:
        retry_at = deliverer.verdict(claim, exc).retry_at
        assert retry_at is not None
        return (retry_at - datetime.now(UTC)).total_seconds()

    assert 4.9 < wait(TransientDeliveryError("timed out", uncertain=True)) <= 5
    assert 4.9 < wait(TransientDeliveryError("504", retry_after=1, uncertain=True)) <= 5
    assert wait(TransientDeliveryError("503")) <= 0.2
    assert 0.9 < wait(TransientDeliveryError("429", retry_after=1)) <= 1


async def test_bad_request_is_dead_lettered_then_replayed(harness: HarnessFactory) -> None:
    """A 400 dead-letters at once with its status and body; a replay then delivers it."""
    h = await harness()
    refuse = True

    async def picky(_call: ErpCall) -> web.Response | None:
        return web.json_response({"error": "unknown order"}, status=400) if refuse else None

    h.erp.respond = picky
    await h.send(order("D-1", "fulfilled", "1ZD"))
    await h.settled()
    [dead] = await h.store.list_entities(outbox_state=OutboxState.DEAD)
    assert dead.entity_key == "D-1"
    assert dead.last_status == 400
    assert "unknown order" in (dead.last_error or "")
    assert len(h.erp.calls) == 1
    [event] = await h.store.list_events(state="dead")
    refuse = False
    assert await h.store.requeue(await h.store.entity_ids_of_event(event.id)) == 1
    h.client.app[DELIVERER].notify()
    await h.settled()
    _first, second = h.erp.calls_to("/api/orders/D-1")
    assert second.headers["Idempotency-Key"] == "order:D-1:r1:replay1"
    assert second.headers["X-Syncd-Replay"] == "true"
    assert await h.store.list_entities(outbox_state=OutboxState.DEAD) == []


async def test_replay_of_delivered_state(harness: HarnessFactory) -> None:
    """Replaying an entity the ERP already has sends it again, marked as a replay."""
    h = await harness()
    await h.send(order("RP-1", "fulfilled", "1ZRP"))
    await h.settled()
    entity = await h.store.get_entity("order", "RP-1")
    assert entity is not None
    assert await h.store.requeue([entity.id]) == 1
    h.client.app[DELIVERER].notify()
    await h.settled()
    calls = h.erp.calls_to("/api/orders/RP-1")
    assert [c.headers.get("X-Syncd-Replay") for c in calls] == [None, "true"]
    assert calls[0].body == calls[1].body


async def test_unnormalisable_message_is_failed_with_reason(harness: HarnessFactory) -> None:
    """A message that parses but names no order is marked failed with the reason, not lost."""
    h = await harness()
    await h.send(envelope("orderEvent", [{"status": "fulfilled"}], "no-key"))
    await h.settled()
    [event] = await h.store.list_events(state="failed")
    assert "customer_identifier" in (event.error or "")
    assert h.erp.calls == []


async def test_every_message_type_is_delivered(harness: HarnessFactory) -> None:
    """Each message type's example reaches its documented ERP path."""
    h = await harness()
    messages = [
        envelope(
            "inboundShipmentEvent",
            [
                {
                    "id": "i1",
                    "customer_identifier": "ASN-1",
                    "status": "onDock",
                    "as_of": "2026-01-01T00:00:00Z",
                }
            ],
            "m-in",
        ),
        envelope(
            "rmaEvent",
            [
                {
                    "id": "r1",
                    "customer_identifier": "RMA-1",
                    "status": "received",
                    "as_of": "2026-01-01T00:00:00Z",
                }
            ],
            "m-rma",
        ),
        envelope(
            "orderUpdateResolution",
            [{"id": "req-1", "customer_order_id": "12345", "status": "success"}],
            "m-upd",
        ),
        envelope(
            "orderCancelResolution",
            [{"id": "req-2", "customer_order_id": "55555", "status": "failure"}],
            "m-can",
        ),
        {
            "event_type": "order.shipped",
            "event_id": "e-1",
            "order_id": "ORD-12345",
            "shipments": [{"tracking_number": "1ZL", "carrier": "UPS", "service_level": "ground"}],
        },
    ]
    for message in messages:
        assert (await h.send(message))[0] == 200
    await h.settled()
    assert sorted(h.erp.records) == [
        "/api/inbound-shipments/ASN-1",
        "/api/order-requests/req-1",
        "/api/order-requests/req-2",
        "/api/orders/ORD-12345",
        "/api/returns/RMA-1",
    ]
    legacy = h.erp.records["/api/orders/ORD-12345"]
    assert legacy["status"] == "fulfilled"
    assert legacy["shipments"][0]["shipping_provider"] == "UPS"
    assert h.erp.records["/api/order-requests/req-2"]["kind"] == "cancel"
