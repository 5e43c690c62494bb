"""Normalisation of MasonHub records into facts, using the OpenAPI file's own examples."""

from __future__ import annotations

import json
from typing import Any

import pytest

from syncd.facts import (
    ORDER_RANKS,
    NormalisationError,
    carrier_stage,
    content_hash,
    message_facts,
    normalise_status,
    order_fact,
    parse_time,
)
from syncd.merge import Current, Outcome, decide, merge_state

ORDER_EVENT = {
    "callback_url": "https://client.com/api/orderEvent",
    "message_type": "orderEvent",
    "message_id": "0896116f-e54b-4756-9d3e-1b0c4a25d821",
    "data": [
        {
            "id": "cb65fyn5-534t-7892-hg67-57g173b54133",
            "customer_identifier": "129374",
            "status": "completed",
            "shipments": [
                {
                    "shipment_id": "s-1",
                    "shipping_provider": "UPS",
                    "shipper_service_level": "ground",
                    "tracking_number": "1Z999AA10123456784",
                    "tracking_url": "https://ups.example/1Z999",
                    "shipment_date_time": "2018-08-06T11:18:46Z",
                    "shipment_line_items": [{"sku_customer_id": "shirt-1", "quantity": 2}],
                }
            ],
            "created_at": "2018-08-05T17:32:28Z",
            "updated_at": "2018-08-05T17:32:28Z",
        }
    ],
}

SKU_CHANGE = {
    "message_type": "skuInventoryChange",
    "message_id": "17f80741-d5bf-4e10-9658-d2e473ab664a",
    "data": [
        {
            "as_of": "2018-10-20T15:12:04.929256-04:00",
            "customer_identifier": "23423tf2",
            "sku_id": "ea957a79-9605-4948-b9f4-6c115d881626",
            "total_available_to_sell": 200,
            "total_units": 305,
            "status_counts": [
                {"inventory_location_id": "a", "inventory_status": "available", "quantity": 150},
                {"inventory_location_id": "b", "inventory_status": "available", "quantity": 50},
                {"inventory_location_id": "a", "inventory_status": "damaged", "quantity": 5},
            ],
        }
    ],
}

INBOUND_COMPLETE = {
    "message_type": "inboundShipmentEvent",
    "message_id": "m",
    "data": [
        {
            "id": "33455ccc",
            "customer_identifier": "12345",
            "status": "receivingCompleted",
            "as_of": "2018-12-11T15:53:23Z",
            "details": {
                "line_items": [
                    {
                        "customer_sku_id": "shirt-534212",
                        "quantity": 100,
                        "total_quantity_received": 90,
                    }
                ]
            },
        }
    ],
}


def one(document: dict[str, object]) -> dict[str, object]:
    [fact] = message_facts(str(document["message_type"]), json.dumps(document).encode())
    return dict(fact.state)


def test_order_event_keeps_every_shipment_field() -> None:
    """An orderEvent becomes the order's state with its tracking numbers, keyed by the ERP id."""
    [fact] = message_facts("orderEvent", json.dumps(ORDER_EVENT).encode())
    assert (fact.entity_type, fact.entity_key) == ("order", "129374")
    assert fact.state["status"] == "completed"  # outside the enum: kept, not fatal
    assert fact.version.rank is None
    [shipment] = fact.state["shipments"]
    assert shipment["tracking_number"] == "1Z999AA10123456784"
    assert shipment["shipment_line_items"] == [{"sku_customer_id": "shirt-1", "quantity": 2}]


def test_inventory_counts_summed_over_locations() -> None:
    """skuInventoryChange counts are absolute, summed per status over locations, as_of in UTC."""
    [fact] = message_facts("skuInventoryChange", json.dumps(SKU_CHANGE).encode())
    assert fact.entity_key == "23423tf2"
    assert fact.state["counts_by_status"] == {"available": 200, "damaged": 5}
    assert fact.state["total_available_to_sell"] == 200
    assert fact.version.timestamp is not None
    assert fact.version.timestamp.isoformat() == "2018-10-20T19:12:04.929256+00:00"


def test_inventory_from_skus_with_counts() -> None:
    """A GET /skus record with inventory_counts gives the same counts shape."""
    from syncd.facts import inventory_fact

    fact = inventory_fact(
        {
            "id": "sku-uuid",
            "customer_identifier": "shirt-1",
            "inventory_counts": {
                "total_units": 102,
                "total_available_to_sell": 88,
                "as_of": "2018-07-21T17:32:28Z",
                "counts_by_status": [
                    {"inventory_status": "damaged", "count": 6},
                    {"inventory_status": "available", "count": 88},
                ],
            },
        },
        "poll",
    )
    assert fact.state["counts_by_status"] == {"available": 88, "damaged": 6}
    assert fact.state["sku_id"] == "sku-uuid"


def test_inbound_shipment_reads_details() -> None:
    """An inbound completion carries its line items from details; status is snake_cased."""
    state = one(INBOUND_COMPLETE)
    assert state["status"] == "received"  # the API's name for the callback's receivingCompleted
    assert state["line_items"] == [
        {"customer_sku_id": "shirt-534212", "quantity": 100, "total_quantity_received": 90}
    ]


def test_inbound_misspelled_status_key() -> None:
    """The spec's misspelled "ststus" key is read as the status."""
    document = {
        "message_type": "inboundShipmentEvent",
        "data": [{"customer_identifier": "A", "ststus": "onDock", "as_of": "2018-12-20T13:41:50Z"}],
    }
    assert one(document)["status"] == "on_dock"


def test_rma_v2_event_type() -> None:
    """An RMA api_version 2.0 event names its stage in event_type."""
    document = {
        "message_type": "rmaEvent",
        "api_version": "2.0",
        "data": [
            {
                "id": "b29a",
                "customer_identifier": "1008908",
                "event_type": "tendered",
                "as_of": "2020-02-20T08:48:32.284951-05:00",
            }
        ],
    }
    assert one(document)["status"] == "tendered"


def test_legacy_order_shipped() -> None:
    """The integration guide's order.shipped becomes a fulfilled order with its shipment."""
    event = {
        "event_type": "order.shipped",
        "event_id": "evt_123",
        "order_id": "ORD-12345",
        "shipments": [{"tracking_number": "1Z", "carrier": "UPS", "service_level": "ground"}],
        "timestamp": "2024-01-15T10:30:00Z",
    }
    [fact] = message_facts("orderEvent", json.dumps(event).encode())
    assert (fact.entity_key, fact.state["status"]) == ("ORD-12345", "fulfilled")
    assert fact.state["shipments"] == [
        {"tracking_number": "1Z", "shipping_provider": "UPS", "shipper_service_level": "ground"}
    ]


def test_snapshot_ready_has_no_facts() -> None:
    """snapshotReady states no entity itself."""
    body = json.dumps({"message_type": "snapshotReady", "data": {"download_url": "x"}}).encode()
    assert message_facts("snapshotReady", body) == []


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"message_type": "orderEvent", "data": [{"status": "packed"}]}, "customer_identifier"),
        ({"message_type": "orderEvent", "data": [7]}, "not an object"),
        ({"message_type": "skuInventoryChange", "data": [{"customer_identifier": "x"}]}, "counts"),
        ({"message_type": "orderUpdateResolution", "data": [{"status": "success"}]}, "no id"),
    ],
)
def test_unnormalisable_records_say_why(document: dict[str, object], reason: str) -> None:
    """A record that cannot become a fact raises NormalisationError with the reason."""
    with pytest.raises(NormalisationError, match=reason):
        message_facts(str(document["message_type"]), json.dumps(document).encode())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("atWarehouse", "at_warehouse"),
        ("inProcess", "in_process"),
        ("in-receiving", "in_receiving"),
        ("partiallyInTransit", "partially_in_transit"),
        ("FULFILLED", "fulfilled"),
        ("", None),
    ],
)
def test_status_normalisation(raw: str, expected: str | None) -> None:
    """camelCase and kebab-case statuses become snake_case; unknown ones are kept."""
    assert normalise_status(raw) == expected


def test_parse_time_lenient() -> None:
    """Offsets, microseconds and Z all parse to UTC; MasonHub's year 1 and garbage give None."""
    parsed = parse_time("2018-10-20T15:12:04.929256-04:00")
    assert parsed is not None
    assert parsed.isoformat() == "2018-10-20T19:12:04.929256+00:00"
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("yesterday") is None


def test_hash_ignores_timestamps() -> None:
    """The same state with another as_of hashes the same; other counts do not."""
    a = {"customer_identifier": "s", "total_units": 1, "as_of": "2026-01-01T00:00:00Z"}
    assert content_hash(a) == content_hash({**a, "as_of": "2026-02-01T00:00:00Z"})
    assert content_hash(a) != content_hash({**a, "total_units": 2})


def test_shipments_merge_by_id() -> None:
    """A later order record listing fewer shipments loses none; an updated one is replaced."""
    previous = {
        "shipments": [
            {"shipment_id": "1", "tracking_number": "A"},
            {"shipment_id": "2", "tracking_number": "B"},
        ]
    }
    new = {"status": "delivered", "shipments": [{"shipment_id": "2", "tracking_number": "B2"}]}
    merged = merge_state("order", previous, new)
    assert merged["shipments"] == [
        {"shipment_id": "1", "tracking_number": "A"},
        {"shipment_id": "2", "tracking_number": "B2"},
    ]


def test_decide_unchanged_when_merge_adds_nothing() -> None:
    """A fact whose fields the entity already holds is unchanged, not a new delivery."""
    [fact] = message_facts("orderEvent", json.dumps(ORDER_EVENT).encode())
    state = dict(fact.state)
    current = Current(state, content_hash(state), fact.version, content_hash(state))
    assert decide(current, fact).outcome is Outcome.UNCHANGED


def test_older_order_record_still_adds_its_shipments() -> None:
    """An order record older than what is known adds the shipments it lists, nothing else."""
    newer = message_facts(
        "orderEvent",
        json.dumps(
            {
                "message_type": "orderEvent",
                "data": [
                    {
                        "customer_identifier": "X",
                        "status": "inTransit",
                        "shipments": [{"shipment_id": "1", "tracking_number": "A"}],
                    }
                ],
            }
        ).encode(),
    )[0]
    older = message_facts(
        "orderEvent",
        json.dumps(
            {
                "message_type": "orderEvent",
                "data": [
                    {
                        "customer_identifier": "X",
                        "status": "fulfilled",
                        "shipments": [{"shipment_id": "2", "tracking_number": "B"}],
                    }
                ],
            }
        ).encode(),
    )[0]
    state = dict(newer.state)
    current = Current(state, content_hash(state), newer.version, content_hash(state))
    decision = decide(current, older)
    assert decision.outcome is Outcome.APPLIED
    assert decision.reason == "older lifecycle status; shipments merged"
    assert decision.state["status"] == "in_transit"
    assert [s["tracking_number"] for s in decision.state["shipments"]] == ["A", "B"]
    assert decision.version == newer.version
    packed_late = message_facts(
        "orderEvent",
        json.dumps(
            {
                "message_type": "orderEvent",
                "data": [{"customer_identifier": "X", "status": "packed"}],
            }
        ).encode(),
    )[0]
    assert decide(current, packed_late).outcome is Outcome.STALE


def test_inbound_callback_and_poll_of_one_receipt_hash_equal() -> None:
    """receivingCompleted (callback) and received (API) are one state: one ERP call."""
    from syncd.facts import inbound_shipment_fact

    callback = inbound_shipment_fact(
        {
            "id": "i",
            "customer_identifier": "A",
            "status": "receivingCompleted",
            "details": {"line_items": [{"customer_sku_id": "s", "quantity": 1}]},
        },
        "webhook",
    )
    polled = inbound_shipment_fact(
        {
            "id": "i",
            "customer_identifier": "A",
            "status": "received",
            "line_items": [{"customer_sku_id": "s", "quantity": 1}],
        },
        "poll",
    )
    assert content_hash(callback.state) == content_hash(polled.state)


def _packages(*stages: str | None) -> list[dict[str, Any]]:
    return [
        {"shipment_id": f"s{i}", "tracking_number": f"1Z{i}", "status": stage}
        for i, stage in enumerate(stages)
    ]


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (("manifested", "manifested"), None),
        (("tendered", "manifested"), "partially_tendered"),
        (("tendered", "tendered"), "tendered"),
        (("inTransit", "tendered"), "partially_in_transit"),
        (("inTransit", "inTransit"), "in_transit"),
        (("delivered", "inTransit"), "partially_delivered"),
        (("delivered", "delivered"), "delivered"),
        (("delivered", "undeliverable"), "delivered"),
        (("undeliverable", "undeliverable"), "undeliverable"),
        (("delivered", None), None),  # a package without a stage: nothing is guessed
        (("delivered", "lostInSpace"), None),
        ((), None),
    ],
)
def test_carrier_stage_of_an_order_is_what_its_packages_add_up_to(
    stages: tuple[str | None, ...], expected: str | None
) -> None:
    """The order-level stage the callbacks name, from the packages' own stages."""
    assert carrier_stage(_packages(*stages)) == expected


def test_polled_fulfilled_order_carries_its_packages_stage() -> None:
    """GET /orders says "fulfilled" while the packages travel: the fact carries their stage
    and its rank, so a poll can repair a lost "delivered" callback."""
    record = {"id": "mh-1", "customer_identifier": "O-1", "status": "fulfilled"}
    delivered = order_fact({**record, "shipments": _packages("delivered")}, "poll")
    assert delivered.state["status"] == "delivered"
    assert delivered.version.rank == ORDER_RANKS["delivered"]
    assert "status" not in delivered.state["shipments"][0]  # the ERP body keeps its shape
    waiting = order_fact({**record, "shipments": _packages("manifested")}, "poll")
    assert waiting.state["status"] == "fulfilled"
    packed = order_fact({**record, "status": "packed", "shipments": _packages("delivered")}, "poll")
    assert packed.state["status"] == "packed"  # only a fulfilled order has carrier stages
