"""The simulated MasonHub's records and their JSON, with the OpenAPI file's field names.

Each record renders itself the way the bulk API answers (``record()``) and, where the two
differ, the way a callback carries it (``event_item()``). Records are mutable (the world
changes them in place) and slotted: the benchmark keeps 100,000 orders in memory.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

#: Every inventory status of the OpenAPI file, in its order.
INVENTORY_STATUSES: Final = (
    "shipped",
    "available",
    "allocated",
    "received",
    "lost",
    "backordered",
    "damaged",
    "quality-control",
    "expected",
    "kit-to-ship-available",
    "oversellable",
    "under-investigation",
    "refurbishing",
    "destroyed",
    "relabeled",
    "consumed",
)
#: Units not (or no longer, or not yet) in the building: left out of ``total_units``, as the
#: spec's example (available 200 + damaged 5 + receiving 100 = 305, expected 0) adds up.
OUTSIDE_STATUSES: Final = frozenset(
    {"shipped", "lost", "backordered", "expected", "oversellable", "destroyed", "consumed"}
    | {"kit-to-ship-available", "relabeled"}
)
#: The one simulated distribution center.
LOCATION_ID: Final = "52c7c6ee-6e63-4f25-db83-c987fc52116c"
LOCATION_ADDRESS: Final = "MasonHub Simulator | 1 Loopback Way, Localhost, CA 90000"
#: Inventory events kept per SKU for ``GET /sku_snapshots`` (the ledger is bounded).
LEDGER_SIZE: Final = 20

#: Order lifecycle (GET /orders enum) and the camelCase names the callbacks use for it.
ORDER_STATUSES: Final = ("open", "at_warehouse", "in_process", "packed", "fulfilled")
CAMEL_STATUSES: Final = {
    "open": "open",
    "at_warehouse": "atWarehouse",
    "in_process": "inProcess",
    "packed": "packed",
    "fulfilled": "fulfilled",
    "canceled": "canceled",
}
#: A package's carrier stages, in order; ``undeliverable`` ends it like ``delivered``.
SHIPMENT_STAGES: Final = ("manifested", "tendered", "inTransit", "delivered")
SHIPMENT_RANKS: Final = {**{s: i for i, s in enumerate(SHIPMENT_STAGES)}, "undeliverable": 3}

TRACKING_URLS: Final = {
    "UPS": "http://ups.com/tracking/{}",
    "USPS": "http://usps.gov/tracking/{}",
    "DHL": "http://dhl.com/tracking/{}",
}


def rfc3339(moment: datetime) -> str:
    """``2024-01-01T00:00:00.000000Z``: RFC 3339 in UTC with microseconds, as MasonHub writes."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _optional(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)


def _without_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    # The spec has no nullable fields: an unknown value is left out rather than null.
    return {k: v for k, v in mapping.items() if v is not None}


# --- SKUs and inventory ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InventoryEvent:
    """One ledger line of a SKU: a status count changed by ``quantity``.

    Kept raw and rendered on demand: building 100,000 orders writes several per order.
    """

    id_bits: int
    sku_id: str
    customer_identifier: str
    event_type: str
    quantity: int
    reference: str
    occurred_at: datetime

    def record(self) -> dict[str, Any]:
        return {
            "id": str(uuid.UUID(int=self.id_bits, version=4)),
            "sku_id": self.sku_id,
            "customer_identifier": self.customer_identifier,
            "inventory_location_id": LOCATION_ID,
            "reference_uri": f"masonhub.co/simulator/{self.reference}",
            "actor_uri": "masonhub.co/simulator",
            "event_type": self.event_type,
            "quantity": self.quantity,
            "occured_at": rfc3339(self.occurred_at),  # sic: the spec's spelling
        }


@dataclass(slots=True, eq=False)
class Sku:
    """A SKU and its inventory counts by status, in the one distribution center."""

    id: str
    customer_identifier: str
    bar_code: str
    product_name: str
    created_at: datetime
    updated_at: datetime
    counts: dict[str, int] = field(default_factory=dict)
    counted_at: dict[str, datetime] = field(default_factory=dict)
    ledger: deque[InventoryEvent] = field(default_factory=lambda: deque(maxlen=LEDGER_SIZE))

    @property
    def total_units(self) -> int:
        """Units in the building, whatever their status."""
        return sum(n for s, n in self.counts.items() if s not in OUTSIDE_STATUSES)

    @property
    def total_available_to_sell(self) -> int:
        """Units that can be sold now."""
        return self.counts.get("available", 0)

    def record(self, *, include_counts: bool = False) -> dict[str, Any]:
        """The ``GET /skus`` record."""
        record: dict[str, Any] = {
            "id": self.id,
            "customer_identifier": self.customer_identifier,
            "customer_bar_code": self.bar_code,
            "brand_name": "Simulated Goods",
            "product_name": self.product_name,
            "product_category": "apparel",
            "product_sub_category": "shirts",
            "product_description": f"{self.product_name}, made up by the simulator",
            "vendor_brand_code": "SIM",
            "customer_brand_code": "SIM",
            "dim_weight": 0.5,
            "dim_length": 10.0,
            "dim_width": 8.0,
            "dim_height": 2.0,
            "dim_volume": 160.0,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }
        if include_counts:
            record["inventory_counts"] = {
                "sku_id": self.id,
                "customer_identifier": self.customer_identifier,
                "total_units": self.total_units,
                "total_available_to_sell": self.total_available_to_sell,
                "counts_by_status": [
                    {"inventory_status": s, "count": n, "as_of": rfc3339(self.counted_at[s])}
                    for s, n in self._ordered_counts()
                ],
                "as_of": rfc3339(self.updated_at),
            }
        return record

    def snapshot(self, *, events: Sequence[InventoryEvent] | None = None) -> dict[str, Any]:
        """The sku snapshot object of ``GET /sku_snapshots`` and skuInventoryChange items.

        ``events`` are the inventory events to carry; the default is the bounded ledger.
        """
        return {
            "as_of": rfc3339(self.updated_at),
            "customer_identifier": self.customer_identifier,
            "sku_id": self.id,
            "total_available_to_sell": self.total_available_to_sell,
            "total_units": self.total_units,
            "status_counts": [
                {
                    "as_of": rfc3339(self.counted_at[s]),
                    "inventory_location_address": LOCATION_ADDRESS,
                    "inventory_location_id": LOCATION_ID,
                    "inventory_status": s,
                    "quantity": n,
                }
                for s, n in self._ordered_counts()
            ],
            "inventory_events": [e.record() for e in (self.ledger if events is None else events)],
        }

    def _ordered_counts(self) -> list[tuple[str, int]]:
        # Every status the SKU ever had, zero or not: callbacks and polls list the same ones.
        return [(s, self.counts[s]) for s in INVENTORY_STATUSES if s in self.counts]


# --- orders and shipments ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class OrderLine:
    """One line of an order, and how much of it inventory could be allocated to."""

    sku_customer_id: str
    quantity: int
    price: float = 0.0
    allocated: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "sku_customer_id": self.sku_customer_id,
            "quantity": self.quantity,
            "price": self.price,
        }


@dataclass(slots=True, eq=False)
class Shipment:
    """One package of an order: tracking, carrier stage, and what is in it."""

    id: str
    shipment_id: str
    order_id: str
    customer_order_id: str
    shipping_provider: str
    shipper_service_level: str
    tracking_number: str
    shipment_date_time: datetime
    updated_at: datetime
    #: (sku customer id, sku id, quantity)
    lines: list[tuple[str, str, int]]
    status: str = "manifested"

    @property
    def customer_identifier(self) -> str:
        """The table key: a shipment has no customer identifier of its own."""
        return self.shipment_id

    @property
    def tracking_url(self) -> str:
        return TRACKING_URLS.get(self.shipping_provider, "http://track.example/{}").format(
            self.tracking_number
        )

    def record(self) -> dict[str, Any]:
        """The shipment as ``GET /shipments`` and an order's ``shipments`` show it."""
        return {
            "id": self.id,
            "shipment_id": self.shipment_id,
            "status": self.status,
            "customer_order_id": self.customer_order_id,
            "shipping_provider": self.shipping_provider,
            "shipper_service_level": self.shipper_service_level,
            "tracking_number": self.tracking_number,
            "tracking_url": self.tracking_url,
            "shipment_date_time": rfc3339(self.shipment_date_time),
            "shipment_line_items": [
                {"sku_customer_id": cid, "sku_id": sku_id, "quantity": n}
                for cid, sku_id, n in self.lines
            ],
        }

    def event_item(self) -> dict[str, Any]:
        """The shipment as an orderEvent carries it (the spec's callback example)."""
        return {
            "shipment_id": self.shipment_id,
            "customer_order_id": self.customer_order_id,
            "shipping_provider": self.shipping_provider,
            "shipper_service_level": self.shipper_service_level,
            "tracking_number": self.tracking_number,
            "tracking_url": self.tracking_url,
            "shipment_date_time": rfc3339(self.shipment_date_time),
            "shipment_line_items": [
                {"sku_customer_id": cid, "quantity": n} for cid, _sku_id, n in self.lines
            ],
        }


@dataclass(slots=True, eq=False)
class Order:
    """A customer order: its posted fields, lifecycle status, shipments and shorts."""

    id: str
    customer_identifier: str
    #: The order as posted (addresses, service level, …) without the fields MasonHub owns.
    fields: Mapping[str, Any]
    lines: list[OrderLine]
    created_at: datetime
    updated_at: datetime
    status: str = "open"
    shipments: list[Shipment] = field(default_factory=list)
    shorts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def carrier_stage(self) -> str | None:
        """The packages' stage as the order's callbacks name it (``partiallyTendered``, …),
        or None before any package reached the carrier."""
        if self.status != "fulfilled" or not self.shipments:
            return None
        stages = [s.status for s in self.shipments]
        if all(s == "undeliverable" for s in stages):
            return "undeliverable"
        ranks = [SHIPMENT_RANKS[s] for s in stages]
        low, high = min(ranks), max(ranks)
        if high == 0:
            return None
        stage = SHIPMENT_STAGES[high]
        return stage if low == high else "partially" + stage[0].upper() + stage[1:]

    def event_status(self, *, camel_case: bool = True) -> str:
        """The status a callback names: the lifecycle, then the packages' carrier stages."""
        stage = self.carrier_stage
        if stage is not None:
            return stage
        return CAMEL_STATUSES.get(self.status, self.status) if camel_case else self.status

    @property
    def terminal(self) -> bool:
        """Nothing more happens to it: canceled, or every package delivered or undeliverable."""
        if self.status == "canceled":
            return True
        return (
            self.status == "fulfilled"
            and bool(self.shipments)
            and all(SHIPMENT_RANKS[s.status] == 3 for s in self.shipments)
        )

    def record(self) -> dict[str, Any]:
        """The ``GET /orders`` (detail) record."""
        return {
            "submitted_at": rfc3339(self.created_at),
            **self.fields,
            "id": self.id,
            "customer_identifier": self.customer_identifier,
            "status": self.status,
            "line_items": [line.record() for line in self.lines],
            "shipments": [s.record() for s in self.shipments],
            "shorts": list(self.shorts),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }

    def event_item(self, *, camel_case: bool = True) -> dict[str, Any]:
        """The orderEvent item: the spec's fields, plus the ``id`` and ``updated_at`` its
        example carries (so a webhook and a poll of one state describe it alike)."""
        return {
            "id": self.id,
            "order_id": self.id,
            "customer_identifier": self.customer_identifier,
            "status": self.event_status(camel_case=camel_case),
            "shipments": [s.event_item() for s in self.shipments],
            "shorts": list(self.shorts),
            "updated_at": rfc3339(self.updated_at),
        }


# --- inbound shipments (ASNs) and returns --------------------------------------------------


@dataclass(slots=True, eq=False)
class InboundLine:
    """One line of an ASN: what is expected and what was received."""

    customer_sku_id: str
    sku_id: str
    quantity: int
    received: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "customer_sku_id": self.customer_sku_id,
            "sku_id": self.sku_id,
            "quantity": self.quantity,
            "total_quantity_received": self.received,
        }


@dataclass(slots=True, eq=False)
class InboundShipment:
    """An inbound shipment (ASN) on its way to, or received at, the distribution center."""

    id: str
    customer_identifier: str
    lines: list[InboundLine]
    expected_arrival_date: datetime
    created_at: datetime
    updated_at: datetime
    status: str = "open"
    version: int = 1
    arrived_at: datetime | None = None
    started_receiving_at: datetime | None = None
    finished_receiving_at: datetime | None = None

    def record(self) -> dict[str, Any]:
        """The ``GET /inbound_shipments`` (detail) record."""
        return _without_none(
            {
                "id": self.id,
                "customer_identifier": self.customer_identifier,
                "customer_purchase_order_id": f"PO-{self.customer_identifier}",
                "manifest_id": self.customer_identifier[-20:],
                "purchase_order_name": f"PO {self.customer_identifier}"[-20:],
                "inventory_location_id": LOCATION_ID,
                "inventory_location_address": LOCATION_ADDRESS,
                "status": self.status,
                "shipper_name": "Simulated Vendor",
                "expected_arrival_date": rfc3339(self.expected_arrival_date),
                "arrived_at": _optional(self.arrived_at),
                "started_receiving_at": _optional(self.started_receiving_at),
                "finished_receiving_at": _optional(self.finished_receiving_at),
                "line_items": [line.record() for line in self.lines],
                "version": self.version,
                "created_at": rfc3339(self.created_at),
                "updated_at": rfc3339(self.updated_at),
            }
        )


@dataclass(slots=True, eq=False)
class RmaLine:
    """One line of a return: what the customer sends back and what arrived."""

    customer_order_id: str
    customer_sku_id: str
    quantity: int
    quantity_received: int = 0
    return_reason_code: str = "tooBig"
    return_inventory_status: str = "qc"
    not_on_original_rma: bool = False

    def record(self) -> dict[str, Any]:
        return _without_none(
            {
                "customer_order_id": self.customer_order_id or None,
                "customer_sku_id": self.customer_sku_id,
                "quantity": self.quantity,
                "quantity_received": self.quantity_received,
                "return_reason_code": self.return_reason_code,
                "return_inventory_status": self.return_inventory_status,
                "not_on_original_rma": self.not_on_original_rma,
            }
        )


@dataclass(slots=True, eq=False)
class Rma:
    """A customer return (RMA): carrier stage, receiving status and received quantities."""

    id: str
    customer_identifier: str
    lines: list[RmaLine]
    created_at: datetime
    updated_at: datetime
    status: str = "open"
    #: The latest carrier stage (tendered, inTransit, …); not a GET status in the spec.
    carrier_status: str | None = None
    version: int = 1
    received_at: datetime | None = None

    def record(self) -> dict[str, Any]:
        """The ``GET /rmas`` (detail) record, also the api_version 1.0 rmaEvent item."""
        return _without_none(
            {
                "id": self.id,
                "customer_identifier": self.customer_identifier,
                "return_type": "rma_submitted_by_customer",
                "status": self.status,
                "package_id": f"PKG-{self.customer_identifier}",
                "received_at": _optional(self.received_at),
                "line_items": [line.record() for line in self.lines],
                "version": self.version,
                "created_at": rfc3339(self.created_at),
                "updated_at": rfc3339(self.updated_at),
            }
        )

    def event_item_v2(self, event: str) -> dict[str, Any]:
        """The api_version 2.0 rmaEvent item: carrier stages say ``event_type``, others
        ``status`` with the record in ``details`` (the spec's two examples)."""
        item: dict[str, Any] = {
            "id": self.id,
            "customer_identifier": self.customer_identifier,
            "as_of": rfc3339(self.updated_at),
        }
        if event in SHIPMENT_RANKS:
            item["event_type"] = event
        else:
            item["status"] = event
            item["details"] = self.record()
        return item
