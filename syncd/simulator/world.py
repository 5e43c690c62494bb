"""The simulated MasonHub account: a deterministic, seeded world that changes and says so.

Everything random comes from one ``random.Random(seed)`` and every timestamp from one clock
(injectable, e.g. a :class:`ManualClock`), so a seed replays the same ids, orders, tracking
numbers and timestamps. Each state change stamps ``updated_at``, re-indexes the record, and
publishes an :class:`Event` (message type and callback item) to the subscribed sinks: the
callback sender. Rendering an event is skipped when no sink wants its message type, which is
what lets the benchmark build 100,000 orders quickly.
"""

from __future__ import annotations

import itertools
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol, TypeVar

from syncd.errors import SyncdError
from syncd.simulator.records import (
    SHIPMENT_RANKS,
    SHIPMENT_STAGES,
    InboundLine,
    InboundShipment,
    InventoryEvent,
    Order,
    OrderLine,
    Rma,
    RmaLine,
    Shipment,
    Sku,
    rfc3339,
)
from syncd.simulator.tables import Record, Table

Clock = Callable[[], datetime]

MESSAGE_TYPES: Final = (
    "orderEvent",
    "skuInventoryChange",
    "inboundShipmentEvent",
    "rmaEvent",
    "snapshotReady",
    "orderUpdateResolution",
    "orderCancelResolution",
)
INBOUND_EVENTS: Final = ("onDock", "receivingStarted", "receivingCompleted")
RMA_CARRIER_EVENTS: Final = ("tendered", "inTransit", "delivered", "undeliverable")
RMA_RECEIPTS: Final = ("receiveFull", "receivePartial", "receiveUnexpected")
RMA_EVENTS: Final = (*RMA_RECEIPTS, "receivingStarted", *RMA_CARRIER_EVENTS)
CARRIERS: Final = ("UPS", "USPS", "DHL")
#: Where received units may land when a receipt "randomizes inventory statuses".
RECEIPT_STATUSES: Final = (
    "available",
    "quality-control",
    "damaged",
    "under-investigation",
    "refurbishing",
)
#: An RMA line's return_inventory_status, as an inventory status.
RETURN_STATUSES: Final = {
    "available": "available",
    "qc": "quality-control",
    "damaged": "damaged",
    "quarantine": "under-investigation",
}
#: Fields an order body must carry (the spec's required list, less those with defaults).
REQUIRED_ORDER_FIELDS: Final = (
    "customer_identifier",
    "shipper_service_level",
    "shipping_address_name",
    "shipping_address_street_line_one",
    "shipping_address_city",
    "shipping_address_locale",
    "shipping_address_postal_code",
    "shipping_address_country_code",
    "submitted_at",
)
#: Order fields MasonHub owns: a posted value is ignored.
_READ_ONLY_ORDER_FIELDS: Final = frozenset(
    {"id", "status", "shipments", "shorts", "created_at", "updated_at", "deleted_at"}
)
_ORDER_DEFAULTS: Final = {"order_type": "customer", "shipping_provider": "masonhub"}
_ADDRESSES: Final = (
    ("Henry Smith", "19 Main Street", "Los Angeles", "CA", "90001"),
    ("Ada Byron", "234 House Lane", "Little Falls", "NJ", "07972"),
    ("Grace Hopper", "8595 Milliken Avenue", "Rancho Cucamonga", "CA", "91730"),
    ("Alan Turing", "1 Loop Road", "Kalamazoo", "MI", "49001"),
)
_SERVICE_LEVELS: Final = ("ground", "2Day", "nextDay", "priority")


class ManualClock:
    """A clock that moves only when told: tests decide every timestamp the world writes.

    ``tick`` seconds are added after each reading, so successive changes get distinct times.
    """

    def __init__(
        self, start: datetime = datetime(2024, 1, 1, tzinfo=UTC), *, tick: float = 0.0
    ) -> None:
        self._now = start
        self._tick = timedelta(seconds=tick)

    def __call__(self) -> datetime:
        now = self._now
        self._now += self._tick
        return now

    def advance(self, seconds: float) -> datetime:
        """Move the clock forward and return the new time."""
        self._now += timedelta(seconds=seconds)
        return self._now

    def set(self, moment: datetime) -> None:
        """Jump to ``moment``."""
        self._now = moment


def system_clock() -> datetime:
    """The real time, in UTC."""
    return datetime.now(UTC)


class WorldError(SyncdError):
    """The simulated MasonHub refused the request."""

    def __init__(self, message: str | None = None, *, field_name: str = "") -> None:
        super().__init__(message)
        self.field_name = field_name


class NotFound(WorldError):
    """The record could not be found."""


class Invalid(WorldError):
    """The request is invalid."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {e}" if f else e for f, e in problems))
        #: (field_name, error) pairs, as the API's results messages list them.
        self.problems = list(problems)


class SnapshotInProgress(WorldError):
    """A snapshot is already being prepared: only one may be outstanding at a time."""

    #: The code MasonHub puts in the body for this refusal.
    code = 399


@dataclass(frozen=True)
class Event:
    """One state change, as a callback carries it.

    ``data`` is the envelope's data (a list of items; an object for snapshotReady).
    ``data_v2``, when set, replaces it for callbacks registered with api_version 2.0.
    """

    message_type: str
    entity_key: str
    data: Any
    data_v2: Any = None


class EventSink(Protocol):
    """Where the world publishes its events (the callback sender)."""

    def wants(self, message_type: str) -> bool:
        """True if an event of this type would be sent anywhere."""
        ...

    def publish(self, event: Event) -> None:
        """Take an event; must not block."""
        ...


@dataclass(slots=True, eq=False)
class Snapshot:
    """A full inventory snapshot: the SKU snapshots as of the request, then a download URL."""

    id: str
    snapshot_type: str
    requested_at: datetime
    skus: list[dict[str, Any]]
    download_url: str | None = None

    @property
    def ready(self) -> bool:
        return self.download_url is not None

    def announcement(self) -> dict[str, Any]:
        """The snapshotReady callback's data object."""
        return {
            "snapshot_id": self.id,
            "download_url": self.download_url,
            "snapshot_type": self.snapshot_type,
            "requested_at": rfc3339(self.requested_at),
        }


class _ActiveSet:
    """Ids with O(1) add, remove and seeded random choice (the orders still moving)."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._positions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def snapshot(self) -> list[str]:
        return list(self._items)

    def add(self, item: str) -> None:
        if item not in self._positions:
            self._positions[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: str) -> None:
        position = self._positions.pop(item, None)
        if position is None:
            return
        last = self._items.pop()
        if last != item:
            self._items[position] = last
            self._positions[last] = position

    def choice(self, rng: random.Random) -> str:
        return self._items[rng.randrange(len(self._items))]


R = TypeVar("R", bound=Record)


@dataclass
class _Counters:
    orders: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    skus: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    inbound: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    rmas: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class World:
    """A deterministic simulated MasonHub account: SKUs, orders, shipments, ASNs and returns.

    Orders move open → at_warehouse → in_process → packed → fulfilled (1 or 2 packages, with
    tracking numbers, inventory decremented) → the packages' carrier stages (tendered,
    inTransit, delivered). Inbound shipments raise inventory when received; returns arrive.
    Records live in :class:`~syncd.simulator.tables.Table` s (``orders``, ``shipments``,
    ``skus``, ``inbound_shipments``, ``rmas``); ``emitted`` counts events by message type.
    """

    def __init__(
        self,
        seed: int | str = 0,
        *,
        clock: Clock | None = None,
        skus: int = 20,
        initial_units: int = 1000,
        camel_case_order_events: bool = True,
    ) -> None:
        # Determinism, not secrecy: the seed must replay the same world.
        self.rng = random.Random(seed)  # noqa: S311
        self.clock: Clock = clock or system_clock
        #: orderEvent statuses as the callback guide writes them (atWarehouse), or snake_case.
        self.camel_case_order_events = camel_case_order_events
        self.orders: Table[Order] = Table()
        self.shipments: Table[Shipment] = Table()
        self.skus: Table[Sku] = Table()
        self.inbound_shipments: Table[InboundShipment] = Table()
        self.rmas: Table[Rma] = Table()
        self.snapshots: dict[str, Snapshot] = {}
        self.pending_snapshot: Snapshot | None = None
        self.emitted: Counter[str] = Counter()
        self._sinks: list[EventSink] = []
        self._active = _ActiveSet()
        self._open_inbound = _ActiveSet()
        self._open_rmas = _ActiveSet()
        self._tracking: dict[str, Shipment] = {}
        self._counters = _Counters()
        self._templates = [
            {
                **_ORDER_DEFAULTS,
                "shipper_service_level": level,
                "shipping_address_name": name,
                "shipping_address_street_line_one": street,
                "shipping_address_city": city,
                "shipping_address_locale": locale,
                "shipping_address_postal_code": postal,
                "shipping_address_country_code": "US",
            }
            for (name, street, city, locale, postal), level in itertools.product(
                _ADDRESSES, _SERVICE_LEVELS
            )
        ]
        for _ in range(skus):
            self.create_sku(available=initial_units)

    # --- plumbing ----------------------------------------------------------------------------

    def subscribe(self, sink: EventSink) -> None:
        """Publish every later event to ``sink`` too (once, however often subscribed)."""
        if sink not in self._sinks:
            self._sinks.append(sink)

    def now(self) -> datetime:
        """The clock's time, as an aware UTC datetime."""
        moment = self.clock()
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment

    def new_id(self) -> str:
        """A MasonHub-style uuid4, from the seeded generator."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _code(self, length: int, alphabet: str = string.ascii_uppercase + string.digits) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(length))

    def _emit(
        self,
        message_type: str,
        key: str,
        render: Callable[[], Any],
        render_v2: Callable[[], Any] | None = None,
    ) -> None:
        self.emitted[message_type] += 1
        sinks = [sink for sink in self._sinks if sink.wants(message_type)]
        if not sinks:
            return
        event = Event(message_type, key, render(), None if render_v2 is None else render_v2())
        for sink in sinks:
            sink.publish(event)

    @staticmethod
    def _find(table: Table[R], key: str, kind: str) -> R:
        record = table.get(key)
        if record is None:
            raise NotFound(f"{kind} {key!r} not found", field_name="customer_identifier")
        return record

    # --- SKUs and inventory ----------------------------------------------------------------------

    def create_sku(self, customer_identifier: str | None = None, *, available: int = 0) -> Sku:
        """A new SKU, with ``available`` units on hand."""
        number = next(self._counters.skus)
        cid = customer_identifier or f"SKU-{number:05d}"
        if cid in self.skus.by_cid:
            raise Invalid([("customer_identifier", f"301: {cid!r} is already taken")])
        now = self.now()
        sku = Sku(
            id=self.new_id(),
            customer_identifier=cid,
            bar_code=f"{self.rng.randrange(10**11, 10**12)}",
            product_name=f"Simulated item {number}",
            created_at=now,
            updated_at=now,
        )
        self.skus.add(sku)
        self._adjust(sku, {"available": available}, reference=f"sku/{cid}", force=True)
        return sku

    def sku(self, key: str) -> Sku:
        """The SKU with this MasonHub id or customer identifier."""
        return self._find(self.skus, key, "sku")

    def create_available(self, sku: str, quantity: int) -> Sku:
        """Units appear as available (data_factory/createAvailable: 0 means 1)."""
        record = self.sku(sku)
        if quantity < 0:
            raise Invalid([("quantity", "must not be negative")])
        self._adjust(record, {"available": quantity or 1}, reference="data_factory/createAvailable")
        return record

    def lose_inventory(self, sku: str, quantity: int) -> Sku:
        """Available units become lost (data_factory/loseInventory: 0 means 1)."""
        record = self.sku(sku)
        if quantity < 0:
            raise Invalid([("quantity", "must not be negative")])
        lost = min(quantity or 1, record.total_available_to_sell)
        self._adjust(record, {"available": -lost, "lost": lost}, reference="data_factory/lose")
        return record

    def _adjust(
        self, sku: Sku, changes: Mapping[str, int], *, reference: str, force: bool = False
    ) -> None:
        """Apply count deltas, record them as inventory events, publish skuInventoryChange."""
        deltas = {status: n for status, n in changes.items() if n or force}
        if not deltas:
            return
        now = self.now()
        events = [
            InventoryEvent(
                self.rng.getrandbits(128),
                sku.id,
                sku.customer_identifier,
                status,
                delta,
                reference,
                now,
            )
            for status, delta in deltas.items()
        ]
        for status, delta in deltas.items():
            sku.counts[status] = sku.counts.get(status, 0) + delta
            sku.counted_at[status] = now
        sku.ledger.extend(events)
        sku.updated_at = now
        self.skus.touched(sku)
        self._emit(
            "skuInventoryChange", sku.customer_identifier, lambda: [sku.snapshot(events=events)]
        )

    # --- orders ------------------------------------------------------------------------------

    def order(self, key: str) -> Order:
        """The order with this MasonHub id or customer identifier."""
        return self._find(self.orders, key, "order")

    def create_orders(self, count: int) -> list[Order]:
        """``count`` new random orders (open, inventory allocated)."""
        return [self.create_order() for _ in range(count)]

    def create_order(
        self,
        customer_identifier: str | None = None,
        *,
        lines: Sequence[tuple[str, int]] | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> Order:
        """A new open order; lines are (SKU customer identifier, quantity), random if None."""
        cid = customer_identifier or f"ORD-{next(self._counters.orders):07d}"
        chosen = list(lines) if lines is not None else self._random_lines(1, 3, 1, 3)
        self._check_order(cid, chosen)
        now = self.now()
        order = Order(
            id=self.new_id(),
            customer_identifier=cid,
            fields=fields if fields is not None else self.rng.choice(self._templates),
            lines=[OrderLine(sku, quantity, price=19.99) for sku, quantity in chosen],
            created_at=now,
            updated_at=now,
        )
        self.orders.add(order)
        self._active.add(order.id)
        for line in order.lines:
            self._allocate(order, line)
        return order

    def submit_order(self, body: Mapping[str, Any]) -> Order:
        """An order posted to ``POST /orders``; Invalid lists every problem found."""
        problems = [(f, "is required") for f in REQUIRED_ORDER_FIELDS if not body.get(f)]
        raw_lines = body.get("line_items")
        if not isinstance(raw_lines, list) or not raw_lines:
            problems.append(("line_items", "at least one line item is required"))
            raw_lines = []
        lines = []
        for index, line in enumerate(raw_lines):
            sku = line.get("sku_customer_id") if isinstance(line, Mapping) else None
            quantity = line.get("quantity") if isinstance(line, Mapping) else None
            if not isinstance(sku, str) or not isinstance(quantity, int) or quantity < 1:
                problems.append((f"line_items[{index}]", "needs sku_customer_id and quantity"))
            else:
                lines.append((sku, quantity))
        if problems:
            raise Invalid(problems)
        fields = {
            **_ORDER_DEFAULTS,
            **{k: v for k, v in body.items() if k not in _READ_ONLY_ORDER_FIELDS},
        }
        fields.pop("line_items", None)
        fields.pop("customer_identifier", None)
        return self.create_order(str(body["customer_identifier"]), lines=lines, fields=fields)

    def _check_order(self, cid: str, lines: Sequence[tuple[str, int]]) -> None:
        problems = []
        if cid in self.orders.by_cid:
            problems.append(
                (
                    "customer_identifier",
                    f"301: {cid!r} is already taken and 'customer_identifier' must be unique",
                )
            )
        for sku, quantity in lines:
            if sku not in self.skus.by_cid:
                problems.append(("sku_customer_id", f"303: 'Sku' {sku!r} does not exist"))
            elif quantity < 1:
                problems.append(("quantity", "must be at least 1"))
        if problems:
            raise Invalid(problems)

    def _random_lines(self, fewest: int, most: int, low: int, high: int) -> list[tuple[str, int]]:
        skus = list(self.skus.by_cid)
        count = min(len(skus), self.rng.randint(fewest, most))
        return [(sku, self.rng.randint(low, high)) for sku in self.rng.sample(skus, count)]

    def _allocate(self, order: Order, line: OrderLine) -> None:
        sku = self.skus.by_cid[line.sku_customer_id]
        line.allocated = min(line.quantity, sku.total_available_to_sell)
        missing = line.quantity - line.allocated
        changes = {
            "available": -line.allocated,
            "allocated": line.allocated,
            "backordered": missing,
        }
        self._adjust(sku, changes, reference=f"order/{order.customer_identifier}")

    def _order_changed(self, order: Order) -> None:
        order.updated_at = self.now()
        self.orders.touched(order)
        if order.terminal:
            self._active.discard(order.id)
        camel = self.camel_case_order_events
        self._emit(
            "orderEvent", order.customer_identifier, lambda: [order.event_item(camel_case=camel)]
        )

    def advance(self, order: str, steps: int = 1) -> Order:
        """Move an order ``steps`` stages on (shipping it when it leaves ``packed``)."""
        record = self.order(order)
        for _ in range(steps):
            if record.terminal:
                break
            self._advance_once(record)
        return record

    def advance_all(self, steps: int = 1) -> int:
        """Move every order still moving one stage on, ``steps`` times; the changes made."""
        changes = 0
        for _ in range(steps):
            for order_id in self._active.snapshot():
                self._advance_once(self.orders.by_id[order_id])
                changes += 1
        return changes

    def _advance_once(self, order: Order) -> None:
        if order.status == "packed":
            self._ship(order, None, None, (), None)
        elif order.status == "fulfilled":
            now = self.now()
            for shipment in order.shipments:
                rank = SHIPMENT_RANKS[shipment.status]
                if rank < 3:
                    self._set_stage(shipment, SHIPMENT_STAGES[rank + 1], now)
            self._order_changed(order)
        else:
            stages = ("open", "at_warehouse", "in_process", "packed")
            order.status = stages[stages.index(order.status) + 1]
            self._order_changed(order)

    def ship_order(
        self,
        order: str,
        *,
        shipping_provider: str | None = None,
        shipper_service_level: str | None = None,
        shorts: Sequence[str] = (),
        number_of_shipments: int | None = None,
    ) -> Order:
        """Ship an order now, from whatever stage it is in (data_factory/shipOrder).

        ``shorts`` lists SKU customer identifiers to short, one unit per mention; a provider
        outside UPS/USPS/DHL means UPS and no service level means Ground, as the spec says.
        """
        record = self.order(order)
        if record.status in ("fulfilled", "canceled"):
            raise Invalid([("order_customer_id", f"order is already {record.status}")])
        provider = shipping_provider if shipping_provider in CARRIERS else "UPS"
        self._ship(record, provider, shipper_service_level or "Ground", shorts, number_of_shipments)
        return record

    def _ship(
        self,
        order: Order,
        provider: str | None,
        level: str | None,
        shorts: Sequence[str],
        packages: int | None,
    ) -> None:
        to_short = Counter(shorts)
        units: list[tuple[str, str]] = []
        order.shorts = []
        for line in order.lines:
            sku = self.skus.by_cid[line.sku_customer_id]
            forced = min(to_short[line.sku_customer_id], line.allocated)
            to_short[line.sku_customer_id] -= forced
            shipped = line.allocated - forced
            backordered = line.quantity - line.allocated
            units += [(sku.customer_identifier, sku.id)] * shipped
            self._short(order, line, backordered, "out_of_stock")
            self._short(order, line, forced, "damaged")
            changes = {
                "allocated": -line.allocated,
                "shipped": shipped,
                "backordered": -backordered,
                "under-investigation": forced,
            }
            self._adjust(sku, changes, reference=f"order/{order.customer_identifier}/ship")
        if units:
            self._pack(order, units, provider, level, packages)
        order.status = "fulfilled"
        self._order_changed(order)

    @staticmethod
    def _short(order: Order, line: OrderLine, quantity: int, reason: str) -> None:
        if quantity:
            order.shorts.append(
                {"sku_customer_id": line.sku_customer_id, "quantity": quantity, "reason": reason}
            )

    def _pack(
        self,
        order: Order,
        units: list[tuple[str, str]],
        provider: str | None,
        level: str | None,
        packages: int | None,
    ) -> None:
        count = packages or (1 if self.rng.random() < 0.7 else 2)
        count = max(1, min(count, len(units)))
        ordered_provider = order.fields.get("shipping_provider")
        carrier = provider or (
            ordered_provider if ordered_provider in CARRIERS else self.rng.choice(CARRIERS)
        )
        service = level or str(order.fields.get("shipper_service_level") or "ground")
        now = self.now()
        for number in range(count):
            contents = Counter(units[number::count])
            shipment = Shipment(
                id=self.new_id(),
                shipment_id=self._code(7, string.ascii_lowercase + string.digits),
                order_id=order.id,
                customer_order_id=order.customer_identifier,
                shipping_provider=carrier,
                shipper_service_level=service,
                tracking_number=self._tracking_number(carrier),
                shipment_date_time=now,
                updated_at=now,
                lines=[(cid, sku_id, n) for (cid, sku_id), n in contents.items()],
            )
            order.shipments.append(shipment)
            self.shipments.add(shipment)
            self._tracking[shipment.tracking_number] = shipment

    def _tracking_number(self, carrier: str) -> str:
        if carrier == "UPS":
            return "1Z" + self._code(16)
        return self._code(22 if carrier == "USPS" else 10, string.digits)

    def _set_stage(self, shipment: Shipment, stage: str, now: datetime) -> None:
        shipment.status = stage
        shipment.updated_at = now
        self.shipments.touched(shipment)

    def shipment_event(self, tracking_number: str, event: str) -> Order:
        """A package reaches a carrier stage (data_factory/orderShipment)."""
        if event not in SHIPMENT_RANKS or event == "manifested":
            raise Invalid([("event", f"unknown shipment event {event!r}")])
        shipment = self._tracking.get(tracking_number)
        if shipment is None:
            raise NotFound(f"no shipment has tracking number {tracking_number!r}")
        order = self.orders.by_id[shipment.order_id]
        self._set_stage(shipment, event, self.now())
        self._order_changed(order)
        return order

    def cancel_order(self, order: str) -> Order:
        """Cancel an order that has not shipped, releasing its inventory."""
        record = self.order(order)
        if record.status in ("fulfilled", "canceled"):
            raise Invalid([("customer_identifier", f"order is already {record.status}")])
        for line in record.lines:
            changes = {
                "allocated": -line.allocated,
                "available": line.allocated,
                "backordered": line.allocated - line.quantity,
            }
            self._adjust(
                self.skus.by_cid[line.sku_customer_id],
                changes,
                reference=f"order/{record.customer_identifier}/cancel",
            )
        record.status = "canceled"
        self._order_changed(record)
        return record

    # --- inbound shipments -------------------------------------------------------------------

    def inbound_shipment(self, key: str) -> InboundShipment:
        """The inbound shipment with this MasonHub id or customer identifier."""
        return self._find(self.inbound_shipments, key, "inbound shipment")

    def create_inbound_shipment(
        self,
        customer_identifier: str | None = None,
        *,
        lines: Sequence[tuple[str, int]] | None = None,
    ) -> InboundShipment:
        """A new open ASN; its units count as expected until received."""
        cid = customer_identifier or f"ASN-{next(self._counters.inbound):06d}"
        if cid in self.inbound_shipments.by_cid:
            raise Invalid([("customer_identifier", f"301: {cid!r} is already taken")])
        chosen = list(lines) if lines is not None else self._random_lines(1, 3, 10, 100)
        now = self.now()
        shipment = InboundShipment(
            id=self.new_id(),
            customer_identifier=cid,
            lines=[InboundLine(sku, self.sku(sku).id, quantity) for sku, quantity in chosen],
            expected_arrival_date=now + timedelta(days=2),
            created_at=now,
            updated_at=now,
        )
        self.inbound_shipments.add(shipment)
        self._open_inbound.add(shipment.id)
        for line in shipment.lines:
            self._adjust(self.sku(line.customer_sku_id), {"expected": line.quantity}, reference=cid)
        return shipment

    def inbound_event(
        self,
        shipment: str,
        event: str,
        *,
        randomize_receipt_qty: bool = False,
        randomize_inventory_statuses: bool = False,
    ) -> InboundShipment:
        """An ASN reaches onDock, receivingStarted or receivingCompleted (data factory)."""
        record = self.inbound_shipment(shipment)
        if event not in INBOUND_EVENTS:
            raise Invalid([("event", f"must be one of {', '.join(INBOUND_EVENTS)}")])
        if record.status == "received":
            raise Invalid([("customer_identifier", "inbound shipment is already received")])
        now = self.now()
        record.arrived_at = record.arrived_at or now
        if event == "receivingStarted":
            record.status = "in-receiving"
            record.started_receiving_at = now
        elif event == "receivingCompleted":
            self._receive(record, randomize_receipt_qty, randomize_inventory_statuses)
            record.finished_receiving_at = now
            self._open_inbound.discard(record.id)
        record.version += 1
        record.updated_at = now
        self.inbound_shipments.touched(record)

        def render() -> list[dict[str, Any]]:
            item: dict[str, Any] = {
                "id": record.id,
                "customer_identifier": record.customer_identifier,
                "status": event,
                "as_of": rfc3339(record.updated_at),
            }
            if event == "receivingCompleted":
                item["details"] = record.record()
            return [item]

        self._emit("inboundShipmentEvent", record.customer_identifier, render)
        return record

    def advance_inbound(self, shipment: str) -> InboundShipment:
        """Move an ASN to its next event: onDock, then receivingStarted, then receivingCompleted."""
        record = self.inbound_shipment(shipment)
        if record.status == "in-receiving":
            event = "receivingCompleted"
        else:
            event = "receivingStarted" if record.arrived_at else "onDock"
        return self.inbound_event(shipment, event)

    def _receive(self, record: InboundShipment, random_qty: bool, random_statuses: bool) -> None:
        record.status = "received"
        for line in record.lines:
            line.received = (
                self.rng.randint(line.quantity // 2, line.quantity + 2)
                if random_qty
                else line.quantity
            )
            changes: Counter[str] = Counter({"expected": -line.quantity})
            changes.update(self._statuses(line.received, "available", random_statuses))
            self._adjust(
                self.sku(line.customer_sku_id), changes, reference=record.customer_identifier
            )

    def _statuses(self, units: int, default: str, randomize: bool) -> Counter[str]:
        if not randomize:
            return Counter({default: units})
        return Counter(self.rng.choice(RECEIPT_STATUSES) for _ in range(units))

    # --- returns -----------------------------------------------------------------------------

    def rma(self, key: str) -> Rma:
        """The RMA with this MasonHub id or customer identifier."""
        return self._find(self.rmas, key, "rma")

    def create_rma(
        self,
        customer_identifier: str | None = None,
        *,
        order: str | None = None,
        lines: Sequence[tuple[str, int]] | None = None,
    ) -> Rma:
        """A new open return: of part of a shipped ``order``, or of ``lines`` (SKU, quantity)."""
        cid = customer_identifier or f"RMA-{next(self._counters.rmas):06d}"
        if cid in self.rmas.by_cid:
            raise Invalid([("customer_identifier", f"301: {cid!r} is already taken")])
        rma_lines = self._return_lines(order, lines)
        now = self.now()
        rma = Rma(
            id=self.new_id(),
            customer_identifier=cid,
            lines=rma_lines,
            created_at=now,
            updated_at=now,
        )
        self.rmas.add(rma)
        self._open_rmas.add(rma.id)
        for line in rma_lines:
            self._adjust(self.sku(line.customer_sku_id), {"expected": line.quantity}, reference=cid)
        return rma

    def _return_lines(
        self, order: str | None, lines: Sequence[tuple[str, int]] | None
    ) -> list[RmaLine]:
        reasons = ("tooBig", "tooSmall", "damaged", "wrongItem", "other")
        if lines is not None:
            return [RmaLine("", sku, quantity) for sku, quantity in lines]
        if order is None:
            return [RmaLine("", sku, quantity) for sku, quantity in self._random_lines(1, 1, 1, 2)]
        record = self.order(order)
        shipped = [(cid, n) for s in record.shipments for cid, _sku_id, n in s.lines]
        if not shipped:
            raise Invalid([("customer_order_id", f"order {order!r} has shipped nothing")])
        sku, quantity = self.rng.choice(shipped)
        line = RmaLine(record.customer_identifier, sku, self.rng.randint(1, quantity))
        line.return_reason_code = self.rng.choice(reasons)
        return [line]

    def rma_event(self, rma: str, event: str, *, randomize_inventory_statuses: bool = False) -> Rma:
        """A return reaches a carrier stage, starts receiving, or is received (data factory)."""
        record = self.rma(rma)
        if event not in RMA_EVENTS:
            raise Invalid([("event", f"must be one of {', '.join(RMA_EVENTS)}")])
        if record.status == "received":
            raise Invalid([("customer_identifier", "rma is already received")])
        now = self.now()
        status_name = event
        if event in RMA_CARRIER_EVENTS:
            record.carrier_status = event
        elif event == "receivingStarted":
            record.status = "in-receiving"
        else:
            self._receive_return(record, event, randomize_inventory_statuses)
            record.received_at = now
            status_name = "received"
            self._open_rmas.discard(record.id)
        record.version += 1
        record.updated_at = now
        self.rmas.touched(record)
        self._emit(
            "rmaEvent",
            record.customer_identifier,
            lambda: [record.record()],
            lambda: [record.event_item_v2(status_name)],
        )
        return record

    def advance_rma(self, rma: str) -> Rma:
        """Move a return to its next event: tendered, inTransit, delivered, then receiveFull."""
        record = self.rma(rma)
        stages = (None, *RMA_CARRIER_EVENTS[:3])
        position = stages.index(record.carrier_status) if record.carrier_status in stages else 3
        event = RMA_CARRIER_EVENTS[position] if position < 3 else "receiveFull"
        return self.rma_event(rma, event)

    def _receive_return(self, record: Rma, event: str, randomize: bool) -> None:
        record.status = "received"
        if event == "receiveUnexpected":
            sku, _quantity = self._random_lines(1, 1, 1, 1)[0]
            record.lines.append(RmaLine("", sku, 0, not_on_original_rma=True))
        for line in record.lines:
            if line.not_on_original_rma:
                line.quantity_received = 1
            elif event == "receivePartial":
                line.quantity_received = self.rng.randint(0, line.quantity)
            else:
                line.quantity_received = line.quantity
            landing = RETURN_STATUSES.get(line.return_inventory_status, "quality-control")
            changes: Counter[str] = Counter({"expected": -line.quantity})
            changes.update(self._statuses(line.quantity_received, landing, randomize))
            self._adjust(
                self.sku(line.customer_sku_id), changes, reference=record.customer_identifier
            )

    # --- snapshots ---------------------------------------------------------------------------

    def request_snapshot(self, snapshot_type: str = "full") -> Snapshot:
        """Start a full snapshot (counts as of now); SnapshotInProgress if one is outstanding."""
        if self.pending_snapshot is not None:
            raise SnapshotInProgress()
        snapshot = Snapshot(
            id=self.new_id(),
            snapshot_type=snapshot_type,
            requested_at=self.now(),
            skus=[sku.snapshot() for sku in self.skus],
        )
        self.snapshots[snapshot.id] = snapshot
        self.pending_snapshot = snapshot
        return snapshot

    def complete_snapshot(self, download_url: str | None = None) -> Snapshot:
        """Finish the outstanding snapshot and announce it with a snapshotReady callback."""
        snapshot = self.pending_snapshot
        if snapshot is None:
            raise Invalid([("snapshot_type", "no snapshot is being prepared")])
        snapshot.download_url = download_url or f"/snapshot_download/{snapshot.id}.json"
        self.pending_snapshot = None
        self._emit("snapshotReady", snapshot.id, snapshot.announcement)
        return snapshot

    # --- random activity ---------------------------------------------------------------------

    def step(self, changes: int = 1) -> int:
        """Make ``changes`` random changes, as a busy warehouse would; returns how many."""
        for _ in range(changes):
            roll = self.rng.random()
            if roll < 0.6 and self._active:
                self._advance_once(self.orders.by_id[self._active.choice(self.rng)])
            elif roll < 0.8:
                self.create_order()
            elif roll < 0.9:
                self._step_inbound()
            else:
                self._step_return()
        return changes

    def _step_inbound(self) -> None:
        if self._open_inbound:
            self.advance_inbound(self._open_inbound.choice(self.rng))
        else:
            self.create_inbound_shipment()

    def _step_return(self) -> None:
        if self._open_rmas:
            self.advance_rma(self._open_rmas.choice(self.rng))
            return
        # A few random orders, not a scan: at 100,000 orders a step stays O(1).
        picks = [self.orders.nth(self.rng.randrange(len(self.orders))) for _ in range(5)]
        shipped = [o for o in picks if o.shipments] if len(self.orders) else []
        self.create_rma(order=shipped[0].id if shipped else None)

    @property
    def active_orders(self) -> int:
        """How many orders are still moving (not canceled, not every package delivered)."""
        return len(self._active)
