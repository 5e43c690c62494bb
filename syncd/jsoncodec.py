"""JSON for the hot paths (entity state in the store, ERP bodies, log lines): orjson writes,
with the standard library behind it for what orjson refuses; the standard library reads.

orjson encodes several times faster than ``json``, which shows in every delivery (its state
written by the merge, its ERP body, its log line). It refuses a few values that ``json``
takes: integers beyond 64 bits, lone surrogates, non-string keys. Those go through ``json``
exactly as before, so no value that stored or sent before fails now.

Reading stays with ``json``: orjson reads an integer beyond 64 bits as a float, so a 30-digit
number in an order would reach the ERP changed, and nothing would say so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

Default = Callable[[Any], Any] | None


def dumps(value: Any, default: Default = None) -> str:
    """Compact JSON text; non-ASCII characters as they are (UTF-8 when encoded)."""
    return dumps_bytes(value, default).decode()


def dumps_bytes(value: Any, default: Default = None) -> bytes:
    """Compact JSON as UTF-8 bytes. What orjson refuses is encoded by ``json`` with non-ASCII
    escaped, which keeps a lone surrogate encodable."""
    try:
        return orjson.dumps(value, default=default)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), default=default).encode()


def loads(data: str | bytes) -> Any:
    """A JSON document, every integer exact (see the module's docstring)."""
    return json.loads(data)
