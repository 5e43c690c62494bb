"""Normalisation: MasonHub records, from callbacks or polls, become typed facts.

A :class:`Fact` says "entity E was in state S as of version V, according to source X". The
state is what the ERP is sent (OpenAPI field names); its content hash leaves out the
timestamps, so a webhook and a poll describing the same state compare equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncd.errors import SyncdError

ORDER = "order"
INVENTORY = "inventory"
INBOUND_SHIPMENT = "inbound_shipment"
RETURN = "return"
ORDER_REQUEST = "order_request"

#: Fields that say *when*, not *what*: kept in the ERP body, left out of the content hash.
VOLATILE_FIELDS = frozenset({"updated_at", "as_of"})

#: Order lifecycle, lowest first. A fact of a lower rank never replaces a higher one.
ORDER_RANKS = {
    "open": 0,
    "at_warehouse": 10,
    "in_process": 20,
    "packed": 30,
    "fulfilled": 40,
    "partially_tendered": 50,
    "tendered": 55,
    "partially_in_transit": 60,
    "in_transit": 65,
    "partially_delivered": 70,
    "delivered": 80,
    "undeliverable": 80,
    "canceled": 90,
}
INBOUND_RANKS = {
    "open": 0,
    "on_dock": 10,
    "receiving_started": 20,
    "in_receiving": 20,
    "receiving_completed": 30,
    "receiving_complete": 30,
    "received": 30,
    "deleted": 90,
}
RETURN_RANKS = {
    "open": 0,
    "submitted": 0,
    "tendered": 10,
    "in_transit": 20,
    "delivered": 30,
    "received": 40,
    "completed": 50,
    "canceled": 90,
}
REQUEST_RANKS = {"pending": 0, "success": 10, "failure": 10}

#: A package's carrier stage (the ``status`` of an order's shipment in GET /orders), lowest
#: first; ``undeliverable`` ends it like ``delivered``.
SHIPMENT_STAGE_RANKS = {
    "manifested": 0,
    "tendered": 1,
    "in_transit": 2,
    "delivered": 3,
    "undeliverable": 3,
}
_STAGE_BY_RANK = {1: "tendered", 2: "in_transit", 3: "delivered"}

#: Legacy ``order.<verb>`` event types to order statuses.
LEGACY_ORDER_STATUS = {
    "created": "open",
    "shipped": "fulfilled",
    "fulfilled": "fulfilled",
    "packed": "packed",
    "cancelled": "canceled",
    "canceled": "canceled",
    "delivered": "delivered",
}

_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")


class NormalisationError(SyncdError):
    """The message parses but does not describe an entity syncd can deliver."""


@dataclass(frozen=True)
class Version:
    """How recent a fact is: lifecycle rank and timestamp, either possibly unknown."""

    rank: int | None = None
    timestamp: datetime | None = None

    def older_than(self, other: Version) -> str | None:
        """Why this version is older than ``other``, or None if it is not.

        Rank decides first (a late "packed" never follows "fulfilled"); at the same rank a
        timestamp decides when both have one; otherwise the later arrival wins.
        """
        if self.rank is not None and other.rank is not None and self.rank != other.rank:
            return "older lifecycle status" if self.rank < other.rank else None
        if (
            self.timestamp is not None
            and other.timestamp is not None
            and self.timestamp < other.timestamp
        ):
            return "older timestamp"
        return None


@dataclass(frozen=True)
class Fact:
    """An entity's state according to one source at one version."""

    entity_type: str
    entity_key: str
    state: Mapping[str, Any]
    version: Version
    source: str


def normalise_status(value: Any) -> str | None:
    """``atWarehouse`` → ``at_warehouse``; unknown statuses are kept, only re-cased."""
    if value is None or value == "":
        return None
    return _CAMEL.sub(r"_\1", str(value).strip()).replace("-", "_").replace(" ", "_").lower()


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp (offsets, microseconds, ``Z``) as aware UTC; None if absent or bad."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.year < 1900:  # MasonHub writes 0001-01-01 for "never"
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def content_hash(state: Mapping[str, Any]) -> str:
    """SHA-256 of the state's canonical JSON, timestamps left out."""
    content = {k: v for k, v in state.items() if k not in VOLATILE_FIELDS}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _key(item: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = item.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    raise NormalisationError(f"record has no {' or '.join(names)}")


def _clean(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


def _ranked(status: str | None, ranks: Mapping[str, int]) -> int | None:
    return None if status is None else ranks.get(status)


# --- orders -------------------------------------------------------------------------------


def _shipment(raw: Mapping[str, Any]) -> dict[str, Any]:
    items = raw.get("shipment_line_items") or raw.get("line_items")
    return _clean(
        {
            "shipment_id": raw.get("shipment_id") or raw.get("id"),
            "tracking_number": raw.get("tracking_number"),
            "tracking_url": raw.get("tracking_url"),
            "shipping_provider": raw.get("shipping_provider") or raw.get("carrier"),
            "shipper_service_level": raw.get("shipper_service_level") or raw.get("service_level"),
            "shipment_date_time": raw.get("shipment_date_time") or raw.get("shipped_at"),
            "shipment_line_items": [
                _clean({"sku_customer_id": i.get("sku_customer_id"), "quantity": i.get("quantity")})
                for i in items
                if isinstance(i, Mapping)
            ]
            if isinstance(items, list)
            else None,
        }
    )


def carrier_stage(shipments: Any) -> str | None:
    """The order status its packages' carrier stages add up to, named as the order's callbacks
    name it: ``in_transit`` when every package is in transit or further, ``partially_in_transit``
    when only some are, and so on. None when no package has reached a carrier yet, or a
    package's stage is missing or unknown (nothing is guessed)."""
    if not isinstance(shipments, list) or not shipments:
        return None
    stages = [
        normalise_status(s.get("status")) if isinstance(s, Mapping) else None for s in shipments
    ]
    if any(stage not in SHIPMENT_STAGE_RANKS for stage in stages):
        return None
    if all(stage == "undeliverable" for stage in stages):
        return "undeliverable"
    ranks = [SHIPMENT_STAGE_RANKS[stage] for stage in stages if stage is not None]
    low, high = min(ranks), max(ranks)
    if high == 0:
        return None
    stage = _STAGE_BY_RANK[high]
    return stage if low == high else f"partially_{stage}"


def order_fact(item: Mapping[str, Any], source: str, *, status: Any = None) -> Fact:
    """An order record (callback item or GET /orders record) as a fact.

    GET /orders says ``fulfilled`` for the whole of an order's life with the carriers; its
    shipments' own statuses tell the stage, so a record shows what a lost ``delivered``
    callback said (see carrier_stage).
    """
    key = _key(item, "customer_identifier", "order_id")
    normalised = normalise_status(status if status is not None else item.get("status"))
    shipments = item.get("shipments")
    if normalised == "fulfilled":
        normalised = carrier_stage(shipments) or normalised
    state = _clean(
        {
            "customer_identifier": key,
            "masonhub_id": item.get("id") if "customer_identifier" in item else None,
            "status": normalised,
            "shipments": [_shipment(s) for s in shipments if isinstance(s, Mapping)]
            if isinstance(shipments, list)
            else None,
            "shorts": item.get("shorts") if isinstance(item.get("shorts"), list) else None,
            "updated_at": item.get("updated_at") or item.get("timestamp"),
        }
    )
    version = Version(_ranked(normalised, ORDER_RANKS), parse_time(state.get("updated_at")))
    return Fact(ORDER, key, state, version, source)


def shipment_fact(record: Mapping[str, Any], source: str) -> Fact:
    """A GET /shipments record as a fact about its order's shipments (the status unknown)."""
    key = _key(record, "customer_order_id", "customer_identifier")
    state = {"customer_identifier": key, "shipments": [_shipment(record)]}
    version = Version(None, parse_time(record.get("updated_at")))
    return Fact(ORDER, key, state, version, source)


# --- inventory ----------------------------------------------------------------------------


def _counts(entries: Any, count_field: str) -> dict[str, int] | None:
    if not isinstance(entries, list):
        return None
    counts: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("inventory_status"):
            status = str(entry["inventory_status"])
            counts[status] = counts.get(status, 0) + int(entry.get(count_field) or 0)
    return dict(sorted(counts.items()))


def inventory_fact(item: Mapping[str, Any], source: str) -> Fact:
    """SKU inventory (skuInventoryChange item, sku_snapshot, or a GET /skus record with counts).

    Counts are absolute, never deltas; per-status counts are summed over locations.
    """
    nested = item.get("inventory_counts")
    counts = nested if isinstance(nested, Mapping) else item
    key = _key(item, "customer_identifier", "sku", "sku_customer_id")
    by_status = _counts(counts.get("status_counts"), "quantity")
    if by_status is None:
        by_status = _counts(counts.get("counts_by_status"), "count")
    state = _clean(
        {
            "customer_identifier": key,
            "sku_id": item.get("sku_id") or (item.get("id") if nested is not None else None),
            "total_units": counts.get("total_units", item.get("on_hand")),
            "total_available_to_sell": counts.get(
                "total_available_to_sell", item.get("available", item.get("quantity"))
            ),
            "counts_by_status": by_status,
            "as_of": counts.get("as_of") or item.get("as_of") or item.get("timestamp"),
        }
    )
    if "total_units" not in state and "total_available_to_sell" not in state:
        raise NormalisationError(f"inventory record for {key!r} has no counts")
    return Fact(INVENTORY, key, state, Version(None, parse_time(state.get("as_of"))), source)


# --- inbound shipments and returns ---------------------------------------------------------


def _line_items(raw: Any, fields: Iterable[str]) -> list[dict[str, Any]] | None:
    if not isinstance(raw, list):
        return None
    return [_clean({f: i.get(f) for f in fields}) for i in raw if isinstance(i, Mapping)]


INBOUND_ITEM_FIELDS = ("customer_sku_id", "quantity", "total_quantity_received")
RETURN_ITEM_FIELDS = (
    "customer_sku_id",
    "customer_order_id",
    "quantity",
    "quantity_received",
    "return_reason_code",
    "return_inventory_status",
)


def _event_record(
    item: Mapping[str, Any], ranks: Mapping[str, int], fields: Iterable[str]
) -> tuple[str, dict[str, Any], Version]:
    # Callback items wrap the record in `details` (or carry only a status); polls give the
    # record itself. The spec misspells inbound status as "ststus"; v2 RMA events say event_type.
    details = item.get("details")
    record = {
        **(details if isinstance(details, Mapping) else {}),
        **{k: v for k, v in item.items() if k != "details"},
    }
    key = _key(item, "customer_identifier")
    raw_status = record.get("status") or record.get("ststus") or record.get("event_type")
    status = normalise_status(raw_status)
    state = _clean(
        {
            "customer_identifier": key,
            "masonhub_id": item.get("id"),
            "status": status,
            "line_items": _line_items(record.get("line_items"), fields),
            "as_of": record.get("as_of") or record.get("updated_at"),
        }
    )
    version = Version(_ranked(status, ranks), parse_time(state.get("as_of")))
    return key, state, version


#: Callback and API names for the same inbound stage; the API's name is kept, so that a
#: callback and a poll of one receipt compare equal.
INBOUND_SYNONYMS = {
    "receiving_started": "in_receiving",
    "receiving_completed": "received",
    "receiving_complete": "received",
}


def inbound_shipment_fact(item: Mapping[str, Any], source: str) -> Fact:
    """An inbound shipment (ASN) event or record as a fact."""
    key, state, version = _event_record(item, INBOUND_RANKS, INBOUND_ITEM_FIELDS)
    status = state.get("status")
    if status in INBOUND_SYNONYMS:
        state["status"] = INBOUND_SYNONYMS[status]
    return Fact(INBOUND_SHIPMENT, key, state, version, source)


def return_fact(item: Mapping[str, Any], source: str) -> Fact:
    """An RMA event (api_version 1.0 or 2.0) or record as a fact."""
    key, state, version = _event_record(item, RETURN_RANKS, RETURN_ITEM_FIELDS)
    return Fact(RETURN, key, state, version, source)


def order_request_fact(item: Mapping[str, Any], source: str, *, kind: str) -> Fact:
    """An order update or cancel resolution as a fact, keyed by the request's id."""
    key = _key(item, "id")
    status = normalise_status(item.get("status"))
    state = _clean(
        {
            "id": key,
            "kind": kind,
            "customer_order_id": item.get("customer_order_id"),
            "status": status,
            "reason": item.get("reason"),
            "updated_at": item.get("updated_at"),
        }
    )
    version = Version(_ranked(status, REQUEST_RANKS), parse_time(state.get("updated_at")))
    return Fact(ORDER_REQUEST, key, state, version, source)


# --- messages -----------------------------------------------------------------------------


ItemNormaliser = Callable[[Mapping[str, Any], str], Fact]

ITEM_NORMALISERS: dict[str, ItemNormaliser] = {
    "orderEvent": order_fact,
    "skuInventoryChange": inventory_fact,
    "inboundShipmentEvent": inbound_shipment_fact,
    "rmaEvent": return_fact,
    "orderUpdateResolution": lambda item, source: order_request_fact(item, source, kind="update"),
    "orderCancelResolution": lambda item, source: order_request_fact(item, source, kind="cancel"),
}

#: Message types that carry no entity state of their own (handled by the polling jobs).
NO_FACTS = frozenset({"snapshotReady"})


def message_facts(message_type: str, body: bytes, source: str = "webhook") -> list[Fact]:
    """The facts one stored message states; NormalisationError says why there are none."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise NormalisationError(f"stored body is not JSON: {exc}") from exc
    if not isinstance(document, Mapping):
        raise NormalisationError("stored message is not a JSON object")
    if message_type in NO_FACTS:
        return []
    if "event_type" in document and "message_type" not in document:
        return [_legacy_fact(message_type, document, source)]
    normaliser = ITEM_NORMALISERS.get(message_type)
    if normaliser is None:
        raise NormalisationError(f"no normaliser for message type {message_type!r}")
    data = document.get("data")
    if isinstance(data, str):
        data = json.loads(data)
    items = data if isinstance(data, list) else [data]
    facts = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise NormalisationError(f"data[{index}] is not an object")
        try:
            facts.append(normaliser(item, source))
        except NormalisationError as exc:
            raise NormalisationError(f"data[{index}]: {exc.message}") from exc
        except (TypeError, ValueError) as exc:
            raise NormalisationError(f"data[{index}]: {exc}") from exc
    return facts


def snapshot_url(body: bytes) -> str | None:
    """The download_url a stored snapshotReady message announces, if it has one."""
    try:
        document = json.loads(body)
        data = document.get("data") if isinstance(document, Mapping) else None
        if isinstance(data, str):
            data = json.loads(data)
    except ValueError:
        return None
    url = data.get("download_url") if isinstance(data, Mapping) else None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def _legacy_fact(message_type: str, event: Mapping[str, Any], source: str) -> Fact:
    verb = str(event["event_type"]).partition(".")[2]
    if message_type == "orderEvent":
        status = event.get("status") or LEGACY_ORDER_STATUS.get(verb, verb or None)
        return order_fact(event, source, status=status)
    normaliser = ITEM_NORMALISERS.get(message_type)
    if normaliser is None:
        raise NormalisationError(f"no normaliser for legacy event {event['event_type']!r}")
    return normaliser(event, source)
