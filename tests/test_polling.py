"""Polling and reconciliation against the simulator, through the real daemon and a local ERP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import syncd.delivery
from syncd.app import DELIVERER, STORE, create_app
from syncd.config import Settings
from syncd.masonhub import MasonHubClient, MasonHubError
from syncd.messages import MESSAGE_TYPES
from syncd.poller import JOBS, PassFailed, Poller
from syncd.simulator import Simulator, start_simulator
from syncd.store import SqlStore
from syncd.testing import LocalErp
from tests.conftest import SECRET, make_settings

Client = TestClient[web.Request, web.Application]


@dataclass
class Rig:
    """The simulator, syncd (webhooks + pipeline) and a recording ERP, wired together."""

    sim: Simulator
    client: Client
    erp: LocalErp
    settings: Settings
    poller: Poller
    masonhub: MasonHubClient

    @property
    def store(self) -> SqlStore:
        return self.client.app[STORE]

    async def settled(self, within: float = 30.0) -> None:
        """Callbacks sent, merged and delivered."""
        await self.sim.sender.wait_idle(within=within)
        async with asyncio.timeout(within):
            while True:
                inbox = await self.store.inbox_counts()
                outbox = await self.store.outbox_counts()
                if not inbox.get("pending") and not outbox.get("pending"):
                    return
                await asyncio.sleep(0.02)

    def tracking(self, key: str) -> list[str]:
        record = self.erp.records.get(f"/api/orders/{key}") or {}
        return sorted(s["tracking_number"] for s in record.get("shipments", []))


RigFactory = Callable[..., Awaitable[Rig]]


class FlakyMasonHub(MasonHubClient):
    """The real client, but MasonHub answers 401 once ``fail_after`` GETs have been made."""

    def __init__(self, settings: Settings, fail_after: int) -> None:
        super().__init__(settings.masonhub)
        self.fail_after = fail_after

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.fail_after <= 0:
            raise MasonHubError("MasonHub answered 401 to GET /orders: token revoked", status=401)
        self.fail_after -= 1
        return await super().request(method, path, **kwargs)


@pytest.fixture
async def rig(
    store_url: str,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> AsyncIterator[RigFactory]:
    """Build the rig; scheduled polls are off so that tests run passes themselves."""
    clients: list[MasonHubClient] = []

    async def make(**sim_options: Any) -> Rig:
        sim = await start_simulator(
            aiohttp_server, seed=7, signing_secret=SECRET, **{"time_factor": 0.001, **sim_options}
        )
        erp = LocalErp()
        erp_server = await aiohttp_server(erp.app())
        off = {"enabled": False}
        settings = make_settings(
            store_url,
            masonhub={"base_url": sim.base_url, "token": sim.token, "page_size": 50},
            erp={"base_url": str(erp_server.make_url("/api")), "backoff_initial": "50ms"},
            poll={job: off for job in JOBS},
            reconcile={"enabled": False, "window": "1d"},
        )
        client = await aiohttp_client(create_app(settings))
        for message_type in MESSAGE_TYPES:
            sim.register_callback(
                str(client.make_url(f"/webhooks/masonhub/{message_type}")), message_type
            )
        masonhub = MasonHubClient(settings.masonhub)
        clients.append(masonhub)
        poller = Poller(
            client.app[STORE], masonhub, settings, on_queued=client.app[DELIVERER].notify
        )
        return Rig(sim, client, erp, settings, poller, masonhub)

    yield make
    for masonhub in clients:
        await masonhub.close()


async def test_lost_callback_is_delivered_by_the_next_poll(rig: RigFactory) -> None:
    """A dropped fulfilled callback: the next incremental poll delivers the tracking numbers
    once, and the same state arriving later by callback makes no second call."""
    r = await rig()
    order = r.sim.world.create_order()
    r.sim.world.advance(order.id, steps=3)  # packed, by callback
    await r.settled()
    r.sim.sender.drop_rate = 1.0
    r.sim.world.advance(order.id)  # fulfilled: the callback is lost
    await r.settled()
    key = order.customer_identifier
    assert r.tracking(key) == []
    report = await r.poller.incremental("orders")
    assert report.corrections == {"order": 1}
    await r.settled()
    expected = sorted(s.tracking_number for s in order.shipments)
    assert r.tracking(key) == expected
    calls = len(r.erp.calls_to(f"/api/orders/{key}"))
    # MasonHub's retry of the lost state finally arrives: nothing new, no call.
    r.sim.sender.drop_rate = 0.0
    r.sim.world.orders.touched(order)
    event = r.sim.world.order(order.id).event_item()
    body = {"message_type": "orderEvent", "message_id": "late-copy", "data": [event]}
    from syncd.testing import dumps, sign

    raw = dumps(body)
    response = await r.client.post(
        "/webhooks/masonhub",
        data=raw,
        headers={"Content-Type": "application/json", "X-MasonHub-Signature": sign(raw, SECRET)},
    )
    assert response.status == 200
    await r.settled()
    assert len(r.erp.calls_to(f"/api/orders/{key}")) == calls


async def test_reconcile_requeues_a_dead_lettered_order_and_it_is_sent_at_once(
    rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ERP refused an order's tracking numbers (a dead letter). Reconciliation queues the
    order again and tells the dispatcher, which sends it without waiting for its idle poll."""
    monkeypatch.setattr(syncd.delivery, "IDLE_POLL", 30.0)
    r = await rig()

    async def refuse(call: Any) -> web.StreamResponse | None:
        if not call.path.startswith("/api/orders/"):
            return None
        return web.json_response({"error": "unknown customer"}, status=400)

    r.erp.respond = refuse
    order = r.sim.world.create_order()
    r.sim.world.advance(order.id, steps=4)  # to fulfilled, each state refused
    await r.settled()
    key = order.customer_identifier
    assert r.tracking(key) == []
    assert (await r.store.outbox_counts()).get("dead") == 1
    r.erp.respond = None
    report = await r.poller.reconcile("orders")
    assert report.redelivered == [key]
    await r.settled(within=5.0)
    assert r.tracking(key) == sorted(s.tracking_number for s in order.shipments)


async def test_lost_delivered_callback_is_repaired_by_the_next_poll(rig: RigFactory) -> None:
    """The packages' carrier stages travel by callback; when the last one is lost, GET /orders
    still says "fulfilled", and its shipments' statuses say how far they got: the next poll
    brings the ERP to "delivered", once, and polling again makes no call."""
    r = await rig()
    order = r.sim.world.create_order()
    r.sim.world.advance(order.id, steps=4)  # fulfilled, by callback
    for shipment in order.shipments:
        r.sim.world.shipment_event(shipment.tracking_number, "inTransit")
    await r.settled()
    path = f"/api/orders/{order.customer_identifier}"
    assert r.erp.records[path]["status"] == "in_transit"
    r.sim.sender.drop_rate = 1.0
    for shipment in order.shipments:
        r.sim.world.shipment_event(shipment.tracking_number, "delivered")  # callbacks lost
    await r.settled()
    assert r.erp.records[path]["status"] == "in_transit"

    report = await r.poller.incremental("orders")
    await r.settled()

    assert report.corrections == {"order": 1}
    assert r.erp.records[path]["status"] == "delivered"
    assert r.tracking(order.customer_identifier) == sorted(
        s.tracking_number for s in order.shipments
    )
    calls = len(r.erp.calls_to(path))
    again = await r.poller.reconcile("orders")
    await r.settled()
    assert again.corrections == {}
    assert len(r.erp.calls_to(path)) == calls


async def test_poll_older_than_delivered_is_stale(rig: RigFactory) -> None:
    """A poll whose record is older than what callbacks delivered makes no call, counted stale;
    one showing the same state makes none either."""
    r = await rig()
    order = r.sim.world.create_order()
    r.sim.world.advance(order.id, steps=5)  # fulfilled, then a carrier stage by callback
    await r.settled()
    key = order.customer_identifier
    calls = len(r.erp.calls_to(f"/api/orders/{key}"))
    report = await r.poller.incremental("orders")  # "fulfilled", its packages at that stage
    await r.settled()
    assert (report.records, report.stale, report.new) == (1, 0, 0)
    # An API that lags behind its callbacks: the packages not yet with the carrier.
    for shipment in order.shipments:
        shipment.status = "manifested"
    r.sim.world.orders.touched(order)
    report = await r.poller.incremental("orders")
    await r.settled()
    assert (report.records, report.stale, report.new) == (1, 1, 0)
    assert len(r.erp.calls_to(f"/api/orders/{key}")) == calls


async def test_failed_pass_keeps_cursor_and_next_pass_repeats_nothing(rig: RigFactory) -> None:
    """A pass that fails halfway leaves its cursor; the next pass re-reads and delivers nothing
    twice."""
    r = await rig()
    r.sim.sender.drop_rate = 1.0  # only polls will tell syncd anything
    orders = r.sim.world.create_orders(120)
    for order in orders:
        r.sim.world.advance(order.id, steps=4)
    await r.poller.incremental("orders")
    cursor = await r.store.get_cursor("orders")
    await r.settled()
    for order in orders[:60]:
        r.sim.world.advance(order.id)  # carrier stages: 60 changed orders
    # MasonHub starts refusing after the first page of the next pass.
    flaky = FlakyMasonHub(r.settings, fail_after=1)
    poller = Poller(r.store, flaky, r.settings, on_queued=r.client.app[DELIVERER].notify)
    with pytest.raises(PassFailed, match="401"):
        await poller.incremental("orders")
    await flaky.close()
    assert await r.store.get_cursor("orders") == cursor
    await r.settled()
    halfway = len(r.erp.calls)
    report = await r.poller.incremental("orders")
    await r.settled()
    assert report.records >= 60
    assert await r.store.get_cursor("orders") != cursor
    keys = {c.path for c in r.erp.calls}
    per_key = {k: [c.headers["Idempotency-Key"] for c in r.erp.calls if c.path == k] for k in keys}
    assert all(len(v) == len(set(v)) for v in per_key.values())
    assert len(r.erp.calls) >= halfway


async def test_reconcile_10k_orders_matches_and_counts_corrections(
    rig: RigFactory, backend: str
) -> None:
    """10,000 orders, 3% of callbacks dropped and 2% duplicated: after the nightly pass the ERP
    matches MasonHub, and the corrections equal the states whose callbacks were lost."""
    if backend != "sqlite":
        pytest.skip("the merge is the same on both backends; this scale test runs on SQLite")
    r = await rig(drop_rate=0.03, duplicate_rate=0.02)
    world = r.sim.world
    registered = list(r.sim.sender.registered())
    for callback in registered:  # the orders' history before syncd was connected...
        r.sim.sender.unregister(callback.id)
    orders = world.create_orders(10_000)
    for order in orders:
        world.advance(order.id, steps=3)  # packed
    first = await r.poller.reconcile("orders")  # ...comes in by the first reconciliation
    assert first.corrections == {"order": 10_000}
    await r.settled(within=300)
    for callback in registered:
        r.sim.register_callback(callback.url, callback.message_type)
    # Every order ships; its callbacks (and the inventory changes') go through the faults.
    # Paced the way a warehouse ships, a thousand at a time.
    for start in range(0, len(orders), 1000):
        for order in orders[start : start + 1000]:
            world.advance(order.id)
        await r.settled(within=300)
    lost_orders = _lost_final_states(r.sim, "orderEvent")
    lost_skus = _lost_final_states(r.sim, "skuInventoryChange")
    assert lost_orders, "the fault should have dropped some final states"
    reports = {job: await r.poller.reconcile(job) for job in ("orders", "inventory")}
    await r.settled(within=300)
    assert reports["orders"].corrections.get("order", 0) == len(lost_orders)
    assert reports["inventory"].corrections.get("inventory", 0) == len(lost_skus)
    for order in orders:
        assert r.tracking(order.customer_identifier) == sorted(
            s.tracking_number for s in order.shipments
        )
        assert r.erp.records[f"/api/orders/{order.customer_identifier}"]["status"] == "fulfilled"
    for sku in world.skus:
        record = r.erp.records[f"/api/inventory/{sku.customer_identifier}"]
        assert (record["total_units"], record["total_available_to_sell"]) == (
            sku.total_units,
            sku.total_available_to_sell,
        )


def _lost_final_states(sim: Simulator, message_type: str) -> set[str]:
    """Entities whose last message of a type never got through (so only a poll can tell)."""
    last: dict[str, Any] = {}
    for message in sim.sender.messages:
        if message.message_type == message_type:
            last[message.entity_key] = message
    lost = {key for key, m in last.items() if m.state.value != "delivered"}
    assert all(last[key].state.value == "dropped" for key in lost), sim.sender.states()
    return lost


async def test_subscriptions_sync_against_simulator(rig: RigFactory, tmp_path: Any) -> None:
    """sync registers what the config wants, removes syncd's unwanted ones, --dry-run changes
    nothing, and other registrations are left alone."""
    from syncd.subscriptions import plan, sync_subscriptions

    r = await rig()
    for callback in list(r.sim.sender.registered()):
        r.sim.sender.unregister(callback.id)
    r.sim.register_callback("https://other.example/hook", "rmaEvent")
    settings = r.settings.model_copy(
        update={
            "webhooks": r.settings.webhooks.model_copy(
                update={
                    "public_url": "https://erp.example",
                    "subscriptions": ("orderEvent", "skuInventoryChange"),
                }
            )
        }
    )
    out: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            out.append(text)

    await sync_subscriptions(settings, r.masonhub, dry_run=True, out=Sink())  # type: ignore[arg-type]
    assert "dry run: nothing changed\n" in out
    assert len(r.sim.sender.registered()) == 1
    await sync_subscriptions(settings, r.masonhub, dry_run=False, out=Sink())  # type: ignore[arg-type]
    urls = sorted(c.url for c in r.sim.sender.registered())
    assert urls == [
        "https://erp.example/webhooks/masonhub/orderEvent",
        "https://erp.example/webhooks/masonhub/skuInventoryChange",
        "https://other.example/hook",
    ]
    fewer = settings.model_copy(
        update={"webhooks": settings.webhooks.model_copy(update={"subscriptions": ("orderEvent",)})}
    )
    changes = plan(fewer, await r.masonhub.callbacks())
    assert [c["message_type"] for c in changes.remove] == ["skuInventoryChange"]
    await sync_subscriptions(fewer, r.masonhub, dry_run=False, out=Sink())  # type: ignore[arg-type]
    assert sorted(c.message_type for c in r.sim.sender.registered()) == ["orderEvent", "rmaEvent"]


async def test_full_snapshot_through_snapshot_ready(rig: RigFactory) -> None:
    """POST /snapshot_request, then MasonHub's snapshotReady callback: syncd downloads the file
    with its token, merges every SKU, and the ERP gets each SKU's counts once."""
    r = await rig()
    world = r.sim.world
    order = world.create_order()
    world.advance(order.id, steps=4)  # shipping changes some counts
    r.sim.sender.drop_rate = 1.0  # none of that reaches syncd by callback
    await r.settled()
    r.sim.sender.drop_rate = 0.0
    await r.masonhub.request_snapshot()
    await r.sim.wait_idle()
    await r.settled()
    await r.erp.wait_for(
        lambda: sum(k.startswith("/api/inventory/") for k in r.erp.records) == len(world.skus),
        within=20,
    )
    for sku in world.skus:
        record = r.erp.records[f"/api/inventory/{sku.customer_identifier}"]
        assert (record["total_units"], record["total_available_to_sell"]) == (
            sku.total_units,
            sku.total_available_to_sell,
        )
    runs = await r.store.recent_runs()
    [snapshot] = [run for run in runs if run["kind"] == "snapshot"]
    assert snapshot["ok"]
    assert snapshot["report"]["records"] == len(world.skus)
