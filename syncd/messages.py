"""MasonHub callback bodies: message types and the split of a request into stored messages.

A request body is one envelope, a JSON array of envelopes, or a legacy flat event of the
integration guide. Each becomes a :class:`ParsedMessage` with the dedupe key that identifies
it across MasonHub's retries. The contents of ``data`` are interpreted later, by the merge.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from syncd.errors import SyncdError

MESSAGE_TYPES = (
    "orderEvent",
    "skuInventoryChange",
    "inboundShipmentEvent",
    "rmaEvent",
    "snapshotReady",
    "orderUpdateResolution",
    "orderCancelResolution",
)

#: Legacy ``event_type`` prefixes (``order.shipped``, ``inventory.updated``) to message types.
LEGACY_PREFIXES = {
    "order": "orderEvent",
    "shipment": "orderEvent",
    "inventory": "skuInventoryChange",
    "sku": "skuInventoryChange",
    "inbound_shipment": "inboundShipmentEvent",
    "inbound": "inboundShipmentEvent",
    "asn": "inboundShipmentEvent",
    "rma": "rmaEvent",
    "return": "rmaEvent",
}

#: Most envelopes one request may carry; MasonHub sends far fewer.
MAX_MESSAGES_PER_REQUEST = 1000

_MAX_KEY = 255
#: The length of the store's message_type columns.
MAX_TYPE_LENGTH = 64


class MalformedBody(SyncdError):
    """The body is not a MasonHub callback."""


@dataclass(frozen=True)
class ParsedMessage:
    """One callback message of a request, ready to be stored."""

    message_type: str
    message_id: str | None
    dedupe_key: str
    body: bytes


def parse_body(raw: bytes, url_message_type: str | None = None) -> list[ParsedMessage]:
    """Split a request body into its messages; raise MalformedBody with the reason.

    ``url_message_type`` is the type named by the URL (``{path}/{message_type}``), used
    when an envelope does not name its own; the two must agree when both are given.
    """
    try:
        # JSON on the wire is UTF-8 (RFC 8259); json.loads would guess UTF-16/32 from bytes.
        document = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"body is not UTF-8: {exc.reason}") from exc
    except ValueError as exc:
        raise MalformedBody(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise MalformedBody("JSON nested too deeply") from exc
    try:
        return _split(document, raw, url_message_type)
    except RecursionError as exc:
        # A depth json.loads accepted can still be too deep to encode an element again.
        raise MalformedBody("JSON nested too deeply") from exc


def _split(document: Any, raw: bytes, url_message_type: str | None) -> list[ParsedMessage]:
    if isinstance(document, dict):
        return [_parse_item(document, raw, url_message_type, where="body")]
    if not isinstance(document, list):
        raise MalformedBody(f"expected a JSON object or array, got {_json_kind(document)}")
    if not document:
        raise MalformedBody("the array holds no messages")
    if len(document) > MAX_MESSAGES_PER_REQUEST:
        raise MalformedBody(f"more than {MAX_MESSAGES_PER_REQUEST} messages in one request")
    return [
        _parse_item(item, _canonical(item), url_message_type, where=f"[{index}]")
        for index, item in enumerate(document)
    ]


def _parse_item(item: Any, raw: bytes, url_type: str | None, *, where: str) -> ParsedMessage:
    if not isinstance(item, dict):
        raise MalformedBody(f"{where}: expected an object, got {_json_kind(item)}")
    if "event_type" in item and "message_type" not in item:
        return _parse_legacy(item, raw, url_type, where=where)
    message_type = item.get("message_type", url_type)
    if not isinstance(message_type, str) or not message_type:
        raise MalformedBody(f"{where}: envelope has no message_type")
    if url_type is not None and message_type != url_type:
        raise MalformedBody(
            f"{where}: message_type {_short(message_type)!r} does not match the URL's {url_type!r}"
        )
    if "data" not in item:
        raise MalformedBody(f"{where}: envelope has no data")
    _check_data(item["data"], where=where)
    message_id = _identifier(item.get("message_id"), "message_id", where=where)
    return ParsedMessage(message_type, _shown(message_id), _dedupe_key(message_id, raw), raw)


def _parse_legacy(
    item: dict[str, Any], raw: bytes, url_type: str | None, *, where: str
) -> ParsedMessage:
    event_type = item["event_type"]
    if not isinstance(event_type, str) or not event_type:
        raise MalformedBody(f"{where}: event_type must be a non-empty string")
    prefix = event_type.split(".", 1)[0]
    message_type = LEGACY_PREFIXES.get(prefix) or url_type or event_type
    # The dedupe key is message_id, else event_id, as for envelopes.
    event_id = _identifier(item.get("message_id"), "message_id", where=where)
    if event_id is None:
        event_id = _identifier(item.get("event_id"), "event_id", where=where)
    return ParsedMessage(message_type, _shown(event_id), _dedupe_key(event_id, raw), raw)


def _check_data(data: Any, *, where: str) -> None:
    if isinstance(data, str):
        # Some senders encode snapshotReady's object as a JSON string.
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise MalformedBody(f"{where}: data is a string but not JSON: {exc}") from exc
    if not isinstance(data, list | dict):
        raise MalformedBody(f"{where}: data must be an array or object, got {_json_kind(data)}")


def _identifier(value: Any, name: str, *, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MalformedBody(f"{where}: {name} must be a string, got {_json_kind(value)}")
    return str(value)


def _dedupe_key(identifier: str | None, raw: bytes) -> str:
    if identifier is None:
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    if len(identifier) > _MAX_KEY or column_text(identifier) != identifier:
        # Too long for the key column, or holding what a database cannot store (NUL, a lone
        # surrogate): the hash keeps every distinct id distinct.
        encoded = identifier.encode("utf-8", "surrogatepass")
        return "sha256-id:" + hashlib.sha256(encoded).hexdigest()
    return identifier


def _shown(identifier: str | None) -> str | None:
    """The id as the message_id column keeps it, for people: storable and at most 255 long."""
    return None if identifier is None else column_text(identifier, _MAX_KEY)


def column_text(text: str, limit: int | None = None) -> str:
    """``text`` as any store can keep it: NUL and lone surrogates (which PostgreSQL refuses)
    replaced by U+FFFD, then cut to ``limit`` characters."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text if limit is None else text[:limit]


def _canonical(item: Any) -> bytes:
    # One element of an array: stored on its own, so two requests that carry the same
    # element without an id hash to the same dedupe key.
    text = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # A lone surrogate (legal in a JSON string escape) has no UTF-8 form: keep its bytes as
    # Python would write them, so the element still stores and hashes the same each time.
    return text.encode("utf-8", "surrogatepass")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
