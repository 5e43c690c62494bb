"""The MasonHub API client: bulk reads for polling, callback registrations, snapshots.

"Everything is a search" at MasonHub: records are read with offset/limit pages and no
cursor. :meth:`MasonHubClient.pages` streams them one page at a time, so memory stays
constant however many records there are, and accepts both response shapes (a bare array
and the ``{"data": [...]}`` wrapper).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from syncd.config import MasonHubSettings
from syncd.erp.http import parse_retry_after
from syncd.errors import SyncdError

log = structlog.get_logger(__name__)

#: MasonHub takes at most this many ids or cids in one filter.
MAX_IDS_PER_REQUEST = 30
ATTEMPTS = 4


class MasonHubError(SyncdError):
    """MasonHub did not answer as expected."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class MasonHubUnavailable(MasonHubError):
    """MasonHub failed in a way worth retrying (connection, timeout, 429, 5xx)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status)


def rfc3339(moment: datetime) -> str:
    """A UTC timestamp as MasonHub's filters take it."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def batched(values: Iterable[str], size: int = MAX_IDS_PER_REQUEST) -> Iterable[list[str]]:
    """Values in lists of at most ``size``."""
    batch: list[str] = []
    for value in values:
        batch.append(value)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _records(document: Any) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return list(document["data"])
    raise MasonHubError("MasonHub answered with neither a JSON array nor a {data: [...]} object")


def _wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        return float(min(retry_after, 120.0))
    return float(min(30.0, 0.5 * 2 ** (state.attempt_number - 1)))


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "masonhub.retry",
        attempt=state.attempt_number,
        error=str(exc),
        wait=round(_wait(state), 3),
    )


class MasonHubClient:
    """MasonHub's REST API over one reused aiohttp session."""

    def __init__(self, settings: MasonHubSettings, *, attempts: int = ATTEMPTS) -> None:
        self._base = settings.base_url.rstrip("/")
        self._token = settings.token.get_secret_value()
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self.page_size = settings.page_size
        self._attempts = attempts
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        url: str | None = None,
    ) -> Any:
        """One call, retried on connection errors, timeouts, 429 and 5xx; JSON answer."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=_wait,
            retry=retry_if_exception(lambda e: isinstance(e, MasonHubUnavailable)),
            before_sleep=_log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._once(method, url or self._base + path, params, body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self, method: str, url: str, params: Mapping[str, str] | None, body: Any
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        try:
            async with self._session_now().request(
                method, url, params=params, data=data, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise MasonHubUnavailable(f"MasonHub timed out: {method} {_path(url)}") from exc
        except aiohttp.ClientError as exc:
            raise MasonHubUnavailable(f"cannot reach MasonHub: {exc}") from exc
        return _answer(method, url, status, raw, retry_after)

    async def pages(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every record of a search, one page at a time, until a short page."""
        offset = 0
        while True:
            query = {**(params or {}), "offset": str(offset), "limit": str(self.page_size)}
            page = _records(await self.request("GET", path, params=query))
            if page:
                yield [r for r in page if isinstance(r, dict)]
            if len(page) < self.page_size:
                return
            offset += len(page)

    async def records(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every record of a search, streamed."""
        async for page in self.pages(path, params):
            for record in page:
                yield record

    async def by_ids(
        self, path: str, name: str, ids: Iterable[str], params: Mapping[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Records for many ids or cids, asked for 30 at a time."""
        for batch in batched(ids):
            async for record in self.records(path, {**(params or {}), name: ",".join(batch)}):
                yield record

    # --- endpoints ---------------------------------------------------------------------

    def orders(self, since: datetime | None = None) -> AsyncIterator[dict[str, Any]]:
        """Orders updated since a time (all orders without one)."""
        return self.records("/orders", _window(since, None, end_param=False))

    def shipments(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Shipments updated in a window."""
        return self.records("/shipments", _window(since, until))

    def skus(self) -> AsyncIterator[dict[str, Any]]:
        """Every SKU with its inventory counts."""
        return self.records("/skus", {"include_counts": "true"})

    def sku_snapshots(self, cids: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
        """Inventory snapshots of known SKUs, 30 customer ids per request."""
        return self.by_ids("/sku_snapshots", "cid", cids)

    def inbound_shipments(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Inbound shipments (ASNs) updated in a window."""
        return self.records("/inbound_shipments", _window(since, until))

    def rmas(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Returns updated in a window."""
        return self.records("/rmas", _window(since, until))

    async def request_snapshot(self) -> Any:
        """Ask for a full inventory snapshot; MasonHub answers later with snapshotReady."""
        return await self.request("POST", "/snapshot_request", body={"snapshot_type": "full"})

    async def download(self, url: str) -> AsyncIterator[dict[str, Any]]:
        """The records of a snapshot file (``download_url``), parsed as they stream in.

        The file is a JSON array (or ``{"data": [...]}``) of SKU snapshots; it is read in
        chunks and each record is yielded as soon as it is complete, so memory holds one
        record at a time however large the file is.
        """
        try:
            async with self._session_now().get(url) as response:
                if response.status >= 400:
                    raw = await response.read()
                    _answer("GET", url, response.status, raw, None)
                parser = JsonArrayStream()
                async for chunk in response.content.iter_chunked(65536):
                    for record in parser.feed(chunk):
                        if isinstance(record, dict):
                            yield record
                parser.close()
        except TimeoutError as exc:
            raise MasonHubUnavailable(f"MasonHub timed out: GET {_path(url)}") from exc
        except aiohttp.ClientError as exc:
            raise MasonHubUnavailable(f"cannot reach MasonHub: {exc}") from exc

    async def callbacks(self, message_type: str | None = None) -> list[dict[str, Any]]:
        """Registered callbacks."""
        params = {"message_type": message_type} if message_type else None
        return [c for c in _records(await self.request("GET", "/callbacks", params=params))]

    async def register_callbacks(self, callbacks: Sequence[Mapping[str, Any]]) -> Any:
        """Register callbacks (at most 30 per call)."""
        answers = []
        for start in range(0, len(callbacks), MAX_IDS_PER_REQUEST):
            chunk = list(callbacks[start : start + MAX_IDS_PER_REQUEST])
            answers.append(await self.request("POST", "/callbacks", body=chunk))
        return answers

    async def delete_callbacks(self, ids: Sequence[str]) -> Any:
        """Remove callbacks by id (at most 30 per call)."""
        return [await self.request("DELETE", "/callbacks", body=batch) for batch in batched(ids)]


class JsonArrayStream:
    """Incremental parser of a JSON array of objects (bare, or under a top-level "data")."""

    def __init__(self) -> None:
        self._decoder = json.JSONDecoder()
        self._text = ""
        self._pending = b""
        self._started = False
        self._done = False

    def feed(self, chunk: bytes) -> list[Any]:
        """The records completed by ``chunk``."""
        data = self._pending + chunk
        try:
            self._text += data.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as exc:  # a character split between chunks
            self._text += data[: exc.start].decode("utf-8")
            self._pending = data[exc.start :]
        records = []
        while (record := self._next()) is not None:
            records.append(record)
        return records

    def close(self) -> None:
        """Raise MasonHubError unless the array was complete."""
        if not self._done:
            raise MasonHubError("the snapshot file ended before its JSON array did")

    def _skip(self) -> None:
        self._text = self._text.lstrip(" \t\r\n,")

    def _start(self) -> bool:
        self._skip()
        if self._text.startswith("{") and '"data"' not in self._text[:200]:
            return False  # wait for more: a wrapper object's "data" key may follow
        start = self._text.find("[")
        if start < 0:
            return False
        self._text = self._text[start + 1 :]
        self._started = True
        return True

    def _next(self) -> Any:
        if self._done or (not self._started and not self._start()):
            return None
        self._skip()
        if self._text.startswith("]"):
            self._done = True
            return None
        try:
            record, end = self._decoder.raw_decode(self._text)
        except ValueError:
            return None  # incomplete: wait for the next chunk
        self._text = self._text[end:]
        return record


def _window(
    since: datetime | None, until: datetime | None, *, end_param: bool = True
) -> dict[str, str]:
    params = {}
    if since is not None:
        params["sdt"] = rfc3339(since)
    if until is not None and end_param:
        params["edt"] = rfc3339(until)
    return params


def _path(url: str) -> str:
    return url.split("?", 1)[0]


def _message(raw: bytes) -> str:
    try:
        document = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", errors="replace").strip()
    if isinstance(document, dict) and document.get("message"):
        return str(document["message"])[:200]
    return ""


def _answer(method: str, url: str, status: int, raw: bytes, retry_after: float | None) -> Any:
    where = f"{method} {_path(url)}"
    if status == 429 or status >= 500:
        raise MasonHubUnavailable(
            f"MasonHub answered {status} to {where}: {_message(raw)}".rstrip(": "),
            status=status,
            retry_after=retry_after,
        )
    if status >= 400:
        hint = {401: "check masonhub.token", 403: "the token may not access this account"}
        detail = _message(raw) or hint.get(status, "")
        raise MasonHubError(f"MasonHub answered {status} to {where}: {detail}", status=status)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise MasonHubError(f"MasonHub answered {where} with invalid JSON") from exc
