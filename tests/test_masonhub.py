"""The MasonHub client: pagination, response shapes, retries, errors, id batching."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aioresponses import aioresponses

from syncd.config import settings_from_dict
from syncd.masonhub import MasonHubClient, MasonHubError, MasonHubUnavailable, batched, rfc3339

BASE = "http://mh.test/acct/api/v1"
ORDERS = re.compile(r"^http://mh\.test/acct/api/v1/orders\?.*$")


@pytest.fixture
async def client() -> AsyncIterator[MasonHubClient]:
    """A client with page size 3 and fast retries."""
    settings = settings_from_dict(
        {
            "masonhub": {"base_url": BASE, "token": "mh-token", "page_size": 3},
            "webhooks": {"signing_secrets": ["x"]},
        },
        environ={},
    ).masonhub
    client = MasonHubClient(settings)
    yield client
    await client.close()


def orders(*keys: str) -> list[dict[str, Any]]:
    return [{"customer_identifier": k, "status": "packed"} for k in keys]


async def collect(client: MasonHubClient) -> list[str]:
    return [r["customer_identifier"] async for r in client.orders()]


def offsets(mocked: aioresponses) -> list[str]:
    return [str(url.query["offset"]) for (_m, url) in mocked.requests]


@pytest.mark.parametrize(
    ("pages", "expected_requests"),
    [
        pytest.param([[]], 1, id="none"),
        pytest.param([orders("a")], 1, id="one"),
        pytest.param([orders("a", "b", "c"), []], 2, id="exactly-one-page"),
        pytest.param([orders("a", "b", "c"), orders("d", "e", "f"), orders("g")], 3, id="many"),
    ],
)
async def test_pagination(
    client: MasonHubClient, mocked: aioresponses, pages: list[Any], expected_requests: int
) -> None:
    """Pages are read with offset/limit until a short page, each record once."""
    for page in pages:
        mocked.get(ORDERS, payload=page)
    expected = [r["customer_identifier"] for page in pages for r in page]
    assert await collect(client) == expected
    requests = [call for calls in mocked.requests.values() for call in calls]
    assert len(requests) == expected_requests
    urls = [url for (_m, url) in mocked.requests]
    assert [u.query["offset"] for u in urls] == [str(3 * i) for i in range(expected_requests)]
    assert all(u.query["limit"] == "3" for u in urls)


async def test_wrapped_response_shape(client: MasonHubClient, mocked: aioresponses) -> None:
    """The {"data": [...]} wrapper is read like a bare array."""
    mocked.get(ORDERS, payload={"limit": 3, "offset": 0, "data": orders("a", "b")})
    assert await collect(client) == ["a", "b"]


async def test_sdt_is_rfc3339(client: MasonHubClient, mocked: aioresponses) -> None:
    """A since time is sent as an RFC 3339 UTC sdt."""
    mocked.get(ORDERS, payload=[])
    since = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    assert [r async for r in client.orders(since)] == []
    [(_method, url)] = list(mocked.requests)
    assert url.query["sdt"] == "2026-12-03T10:00:00.000000Z"
    assert rfc3339(since) == "2026-12-03T10:00:00.000000Z"


async def test_429_then_success(client: MasonHubClient, mocked: aioresponses) -> None:
    """A 429 with Retry-After is waited out and retried."""
    mocked.get(ORDERS, status=429, headers={"Retry-After": "0"})
    mocked.get(ORDERS, payload=orders("a"))
    assert await collect(client) == ["a"]


async def test_500_three_times_then_success(client: MasonHubClient, mocked: aioresponses) -> None:
    """Three 500s are retried; the fourth attempt's answer is used."""
    for _ in range(3):
        mocked.get(ORDERS, status=500, payload={"message": "oops"}, headers={"Retry-After": "0"})
    mocked.get(ORDERS, payload=orders("a"))
    assert await collect(client) == ["a"]


async def test_500_forever_gives_up(client: MasonHubClient, mocked: aioresponses) -> None:
    """After the last attempt a 5xx is an error naming the status and MasonHub's message."""
    for _ in range(4):
        mocked.get(
            ORDERS, status=503, payload={"message": "maintenance"}, headers={"Retry-After": "0"}
        )
    with pytest.raises(
        MasonHubUnavailable,
        match=re.escape("503 to GET http://mh.test/acct/api/v1/orders: maintenance"),
    ):
        await collect(client)


@pytest.mark.parametrize(
    ("status", "needle"),
    [(401, "token provided is missing"), (403, "not signed"), (404, "could not be found")],
)
async def test_client_errors_are_clear_and_not_retried(
    client: MasonHubClient, mocked: aioresponses, status: int, needle: str
) -> None:
    """401/403/404 are one clear error with MasonHub's message, asked once."""
    messages = {
        401: "The access token provided is missing or invlid.",
        403: "Your request was not signed or the signature didn't match our records.",
        404: "The record or records you are looking for could not be found.",
    }
    mocked.get(ORDERS, status=status, payload={"message": messages[status]})
    with pytest.raises(MasonHubError, match=needle) as caught:
        await collect(client)
    assert not isinstance(caught.value, MasonHubUnavailable)
    assert caught.value.status == status


async def test_ids_in_batches_of_30(client: MasonHubClient, mocked: aioresponses) -> None:
    """Many cids are asked for 30 at a time."""
    snapshots = re.compile(r"^http://mh\.test/acct/api/v1/sku_snapshots\?.*$")
    for _ in range(3):
        mocked.get(snapshots, payload={"data": []})
    cids = [f"sku-{i}" for i in range(65)]
    assert [r async for r in client.sku_snapshots(cids)] == []
    sent = [url.query["cid"].split(",") for (_m, url) in mocked.requests]
    assert [len(batch) for batch in sent] == [30, 30, 5]
    assert [c for batch in sent for c in batch] == cids
    assert list(batched(["a", "b", "c"], 2)) == [["a", "b"], ["c"]]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 100_000])
def test_json_array_stream_any_chunking(size: int) -> None:
    """Records are yielded whole however the bytes are split, UTF-8 characters included."""
    from syncd.masonhub import JsonArrayStream

    records = [
        {"customer_identifier": f"sku-é-{i}", "total_units": i, "nested": {"a": [1, 2]}}
        for i in range(20)
    ]
    for document in (records, {"limit": 100, "data": records}):
        raw = json.dumps(document, ensure_ascii=False).encode()
        parser = JsonArrayStream()
        got = [
            r for start in range(0, len(raw), size) for r in parser.feed(raw[start : start + size])
        ]
        parser.close()
        assert got == records


def test_json_array_stream_truncated() -> None:
    """A file that ends inside its array is an error, not a silent partial import."""
    from syncd.masonhub import JsonArrayStream

    parser = JsonArrayStream()
    assert parser.feed(b'[{"a": 1}, {"b"') == [{"a": 1}]
    with pytest.raises(MasonHubError, match="ended before"):
        parser.close()
