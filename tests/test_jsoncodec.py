"""The hot-path JSON codec: orjson's output where it can, the standard library's otherwise."""

from __future__ import annotations

import json
import math
from types import MappingProxyType
from typing import Any

import pytest

from syncd import jsoncodec


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "b": [True, None, 1.5], "c": {"d": "é 東京"}},
        [],
        "plain",
    ],
)
def test_round_trip_equals_the_standard_library(value: Any) -> None:
    """What orjson encodes decodes to the same value json.loads gives."""
    text = jsoncodec.dumps(value)
    assert json.loads(text) == value
    assert jsoncodec.loads(text) == value
    assert jsoncodec.loads(text.encode()) == value


def test_non_ascii_is_written_as_utf8_not_escaped() -> None:
    """Text is compact and UTF-8, as the ERP body always was."""
    assert jsoncodec.dumps_bytes({"name": "Zoë"}) == '{"name":"Zoë"}'.encode()


@pytest.mark.parametrize(
    "value",
    [{"big": 2**70}, {"odd": "\ud800"}, {1: "int key"}],
    ids=["70-bit integer", "lone surrogate", "integer key"],
)
def test_values_orjson_refuses_take_the_standard_library(value: Any) -> None:
    """No value json could encode fails here: the fallback writes valid, UTF-8-safe JSON."""
    data = jsoncodec.dumps_bytes(value)
    data.decode("utf-8")  # a lone surrogate is escaped, not written raw
    assert jsoncodec.loads(data) == json.loads(json.dumps(value))


def test_documents_orjson_refuses_are_read_by_the_standard_library() -> None:
    """NaN and a huge integer, which json wrote and reads, are still read."""
    assert math.isnan(jsoncodec.loads('{"x": NaN}')["x"])
    assert jsoncodec.loads(str(2**70)) == 2**70


@pytest.mark.parametrize("number", [10**30, -(2**63) - 1, 2**64 + 1, -(10**40)])
def test_integers_beyond_64_bits_come_back_exact(number: int) -> None:
    """A state holding a huge integer is read back as that integer, not a float near it."""
    back = jsoncodec.loads(jsoncodec.dumps_bytes({"n": number}))["n"]
    assert type(back) is int
    assert back == number


def test_default_is_applied_and_its_refusal_is_a_type_error() -> None:
    """A ``default`` turns unknown objects into JSON; one it refuses raises TypeError."""
    proxy = MappingProxyType({"a": 1})
    assert jsoncodec.dumps({"m": proxy}, default=dict) == '{"m":{"a":1}}'

    def refuse(value: object) -> object:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    with pytest.raises(TypeError):
        jsoncodec.dumps({"s": {1, 2}}, default=refuse)
