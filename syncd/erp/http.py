"""The ``http`` ERP adapter: a generic REST bridge that PUTs each entity's full state.

The contract (paths, headers, which answers are transient) is in DESIGN.md, "ERP adapter
`http`". Only connection-level failures are retried here, a few times and quickly; everything
else is reported to the delivery layer, which owns the retry schedule and dead letters.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from syncd import jsoncodec
from syncd.config import ErpSettings
from syncd.erp import DEFAULT_PATHS, Delivery, DeliveryResult
from syncd.errors import PermanentDeliveryError, TransientDeliveryError

__all__ = ["HttpErpAdapter", "parse_retry_after"]

log = structlog.get_logger(__name__)

# A delivery's total timeout also covers waiting for a free pooled connection, so the pool must
# never be smaller than the number of concurrent deliveries (erp.concurrency, at most 256), or
# deliveries would time out queueing inside syncd. It stays bounded (not limit=0) so that a bug
# spawning deliveries cannot open an unbounded number of sockets to the ERP.
MIN_POOL_SIZE: Final = 100
CONNECT_ATTEMPTS: Final = 3
TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})
# A gateway's answer that its upstream failed or timed out: the ERP behind it may still apply
# the request (see TransientDeliveryError.uncertain).
UNCERTAIN_STATUSES: Final = frozenset({502, 504})
# Only so much of an error body is worth keeping: it ends up in a dead letter.
BODY_READ_BYTES: Final = 4096
# A 2xx body is read (and discarded) so its connection can go back to the pool; one larger than
# this is abandoned and the connection closed instead.
DRAIN_BYTES: Final = 65536

_DELTA_SECONDS: Final = re.compile(r"-?\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class _Sent:
    """Whether any attempt of one delivery may have reached the ERP (all but failed connects)."""

    maybe: bool = False


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str
    retry_after: str | None
    body: str


class HttpErpAdapter:
    """Delivers entities to an ERP's REST API, one idempotent PUT per delivery."""

    def __init__(self, settings: ErpSettings) -> None:
        self._settings = settings
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        """PUT the delivery; raise TransientDeliveryError or PermanentDeliveryError if refused."""
        url = self._url(delivery)
        body = _encode(delivery.payload)
        headers = self._headers(delivery)
        started = time.perf_counter()
        sent = _Sent()
        try:
            answer = await self._exchange_retrying(url, body, headers, delivery, sent)
        except TimeoutError as exc:  # before ClientConnectionError: ServerTimeoutError is both
            message = f"ERP timed out after {self._settings.timeout:g}s"
            raise TransientDeliveryError(message, uncertain=True) from exc
        except aiohttp.ClientConnectorError as exc:
            message = f"cannot connect to ERP: {self._describe(exc)}"
            raise TransientDeliveryError(message, uncertain=sent.maybe) from exc
        except aiohttp.ClientConnectionError as exc:
            message = f"connection to ERP lost: {self._describe(exc)}"
            raise TransientDeliveryError(message, uncertain=True) from exc
        except aiohttp.ClientError as exc:  # e.g. a malformed response: maybe better next time
            message = f"ERP request failed: {self._describe(exc)}"
            raise TransientDeliveryError(message, uncertain=True) from exc
        elapsed = time.perf_counter() - started
        return _outcome(answer, elapsed)

    async def close(self) -> None:
        """Close the HTTP session; deliveries after this fail as transient."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # --- request ----------------------------------------------------------------------------

    def _url(self, delivery: Delivery) -> str:
        if delivery.entity_type not in DEFAULT_PATHS:
            raise PermanentDeliveryError(f"no ERP path for entity type {delivery.entity_type!r}")
        key, default = DEFAULT_PATHS[delivery.entity_type]
        template = self._settings.paths.get(key) or default
        # safe="": an identifier containing "/" must stay one path segment.
        return self._settings.base_url + template.format(id=quote(delivery.entity_key, safe=""))

    def _headers(self, delivery: Delivery) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": delivery.idempotency_key,
            "X-Syncd-Source": delivery.source,
        }
        if token := self._settings.token.get_secret_value():
            headers["Authorization"] = f"Bearer {token}"
        if delivery.replay:
            headers["X-Syncd-Replay"] = "true"
        return headers

    def _session_for_request(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TransientDeliveryError("ERP adapter is closed")
        # Created here, not in __init__: a ClientSession belongs to the running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=max(MIN_POOL_SIZE, self._settings.concurrency))
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def _exchange_retrying(
        self, url: str, body: bytes, headers: Mapping[str, str], delivery: Delivery, sent: _Sent
    ) -> _Answer:
        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "erp.connection_retry",
                attempt=state.attempt_number,
                max_attempts=CONNECT_ATTEMPTS,
                error=self._describe(error) if error else None,
                wait=round(state.upcoming_sleep, 3),
                entity_type=delivery.entity_type,
                entity_key=delivery.entity_key,
            )

        # The first attempt runs on its own: nearly every call succeeds at once, and tenacity's
        # machinery costs about as much Python time as a fast ERP call itself.
        try:
            return await self._exchange(url, body, headers, sent)
        except Exception as exc:
            if not _is_connection_failure(exc):
                raise
            first_failure = exc

        # A new AsyncRetrying per call: its iteration state is not safe to share between tasks.
        # Retrying after the request was sent is safe too: the PUT is idempotent.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(CONNECT_ATTEMPTS),
            wait=wait_exponential_jitter(multiplier=0.1, max=1.0, jitter=0.1),
            retry=retry_if_exception(_is_connection_failure),
            before_sleep=log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first_failure  # tenacity's attempt 1 is the one made above
                return await self._exchange(url, body, headers, sent)
        raise AssertionError("unreachable: tenacity reraises the last failure")  # pragma: no cover

    async def _exchange(
        self, url: str, body: bytes, headers: Mapping[str, str], sent: _Sent
    ) -> _Answer:
        session = self._session_for_request()
        try:
            async with session.put(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    await _read_at_most(response, DRAIN_BYTES)
                    text = ""
                else:
                    text = _excerpt(await _read_at_most(response, BODY_READ_BYTES))
                return _Answer(
                    status=response.status,
                    reason=_one_line(response.reason or _phrase(response.status)),
                    retry_after=response.headers.get("Retry-After"),
                    body=text,
                )
        except aiohttp.ClientConnectorError:
            raise  # no connection was made, so nothing was sent
        except BaseException:
            sent.maybe = True
            raise

    def _describe(self, exc: BaseException) -> str:
        """An exception as one line, never containing the token."""
        text = _one_line(str(exc)) or type(exc).__name__
        token = self._settings.token.get_secret_value()
        return text.replace(token, "[redacted]") if token else text


# --- helpers ------------------------------------------------------------------------------------


def _is_connection_failure(exc: BaseException) -> bool:
    # aiohttp's ServerTimeoutError is also a ClientConnectionError, but a timeout is reported
    # at once: retrying it here could hold a delivery for several timeouts.
    return isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(exc, TimeoutError)


def _encode(payload: Mapping[str, Any]) -> bytes:
    try:
        return jsoncodec.dumps_bytes(payload, default=_jsonable_mapping)
    except (TypeError, ValueError) as exc:
        raise PermanentDeliveryError(f"payload is not JSON-serialisable: {exc}") from exc


def _jsonable_mapping(value: object) -> object:
    # json only knows dict; a payload may be any Mapping (a MappingProxyType, say).
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body; whatever arrived if reading it fails."""
    chunks: list[bytes] = []
    remaining = limit
    # The status line already says what happened; the body is only an illustration.
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        while remaining > 0:
            chunk = await response.content.read(remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    return b"".join(chunks)


def _excerpt(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").strip()[
        : TransientDeliveryError.BODY_EXCERPT_CHARS
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _outcome(answer: _Answer, elapsed: float) -> DeliveryResult:
    status = answer.status
    if 200 <= status < 300:
        return DeliveryResult(status=status, elapsed=elapsed)
    message = f"ERP answered {status} {answer.reason}".rstrip()
    if status in TRANSIENT_STATUSES or 500 <= status < 600:
        raise TransientDeliveryError(
            message,
            status=status,
            body=answer.body,
            retry_after=parse_retry_after(answer.retry_after),
            uncertain=status in UNCERTAIN_STATUSES,
        )
    # Redirects are not followed (a PUT must not silently land elsewhere), so 3xx is a refusal.
    raise PermanentDeliveryError(message, status=status, body=answer.body)
