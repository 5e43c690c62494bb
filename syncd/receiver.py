"""The webhook receiver: authenticate, bound, parse and durably store MasonHub callbacks.

Checks run cheapest first and nothing is stored before authentication passes:
address (403), content type (415), size while reading (413), signature and token (401),
parse (400, body quarantined), then the group commit (503 if the store is down). The 200
goes out only after the transaction holding the message has committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from syncd import jsoncodec
from syncd.config import Settings
from syncd.errors import StoreUnavailable
from syncd.inbox import GroupCommitter
from syncd.logs import log_line
from syncd.messages import (
    MAX_TYPE_LENGTH,
    MESSAGE_TYPES,
    MalformedBody,
    ParsedMessage,
    column_text,
    parse_body,
)
from syncd.metrics import Metrics
from syncd.store import NewMessage, QuarantinedBody, SqlStore

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)
#: Request headers kept with a stored message; never the signature or a token.
_KEPT_HEADERS = ("content-type", "user-agent", "x-request-id", "x-forwarded-for")
_SECRET_HEADERS = ("x-masonhub-signature", "x-masonhub-token", "authorization")
_READ_CHUNK = 64 * 1024
#: Seconds a client may take to send its body: a trickling client must not hold a request
#: (and the shutdown drain) open for ever. MasonHub sends a callback in milliseconds.
BODY_TIMEOUT = 30.0


def signature_valid(body: bytes, header: str | None, secrets: Sequence[bytes]) -> bool:
    """True if ``header`` (``sha256=<hex>`` or bare hex) is HMAC-SHA256 of body under a secret.

    Every secret is tried, whether or not an earlier one matched, so the time taken does
    not tell which one matched.
    """
    if not header:
        return False
    value = header.strip()
    if value[:7].lower() == "sha256=":
        value = value[7:]
    if not _HEX_SHA256.fullmatch(value):
        return False
    given = bytes.fromhex(value)
    matched = False
    for secret in secrets:
        expected = hmac.new(secret, body, hashlib.sha256).digest()
        matched |= hmac.compare_digest(expected, given)
    return matched


def token_valid(headers: Any, token: bytes) -> bool:
    """True if the callback token is in ``Authorization: Bearer`` or ``X-MasonHub-Token``."""
    authorization = headers.get("Authorization", "")
    given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    given = given or headers.get("X-MasonHub-Token", "").strip()
    return bool(given) and hmac.compare_digest(given.encode(), token)


def _parse_ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in_any(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address in network for network in networks)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[IPNetwork]
) -> IPAddress | None:
    """The caller's address: the peer, or from X-Forwarded-For when the peer is a trusted proxy.

    X-Forwarded-For is read from the right, skipping trusted proxies; the first untrusted hop
    is the client. A malformed hop makes the address unknown (None).
    """
    address = _parse_ip(peer)
    if address is None or not forwarded_for or not _in_any(address, trusted_proxies):
        return address
    for hop in reversed(forwarded_for.split(",")):
        address = _parse_ip(hop)
        if address is None or not _in_any(address, trusted_proxies):
            return address
    return address


@dataclass(frozen=True)
class Answer:
    """What a webhook request is answered, and what is logged about it."""

    status: int
    outcome: str
    error: str | None = None
    messages: Sequence[ParsedMessage] = ()
    new: int = 0
    duplicates: int = 0
    ignored: int = 0

    def response(self) -> web.Response:
        body: dict[str, str] = {"status": self.outcome}
        if self.error is not None:
            body["error"] = self.error
        return web.Response(
            body=jsoncodec.dumps_bytes(body),
            status=self.status,
            content_type="application/json",
            charset="utf-8",
        )


def _reject(status: int, outcome: str, error: str) -> Answer:
    return Answer(status=status, outcome=outcome, error=error)


class WebhookReceiver:
    """Handles ``POST {webhooks.path}`` and ``POST {webhooks.path}/{message_type}``."""

    def __init__(
        self,
        settings: Settings,
        store: SqlStore,
        committer: GroupCommitter,
        metrics: Metrics | None = None,
    ) -> None:
        hooks = settings.webhooks
        self._metrics = metrics or Metrics()
        self._store = store
        self._committer = committer
        self._secrets = [s.get_secret_value().encode() for s in hooks.signing_secrets]
        self._token = hooks.callback_token.get_secret_value().encode()
        self._unauthenticated = hooks.allow_unauthenticated and not hooks.authenticated
        self._allowed = tuple(hooks.allowed_ips)
        self._proxies = tuple(settings.server.trusted_proxies)
        self._subscribed = frozenset(hooks.subscriptions)
        self._max_body = settings.server.max_body_bytes
        #: Set when the daemon stops: new callbacks get 503 so MasonHub sends them again.
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one callback request (see DESIGN.md for every status)."""
        started = time.perf_counter()
        # Several X-Forwarded-For lines are one list (RFC 9110 5.3): a proxy that adds its own
        # line after the client's must not leave the client's first line believed.
        forwarded = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        remote = client_address(request.remote, forwarded, self._proxies)
        self._in_flight += 1
        self._idle.clear()
        try:
            answer = await self._answer(request, remote)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        elapsed = time.perf_counter() - started
        _log_answer(answer, request, remote, elapsed)
        self._observe(answer, request, elapsed)
        return answer.response()

    def _observe(self, answer: Answer, request: web.Request, elapsed: float) -> None:
        named = answer.messages[0].message_type if answer.messages else None
        named = named or request.match_info.get("message_type")
        # Only known types become label values: a caller must not grow our time series.
        label = named if named in MESSAGE_TYPES else "other"
        self._metrics.webhooks.labels(label, answer.outcome).inc()
        self._metrics.ingest_seconds.observe(elapsed)

    def set_subscriptions(self, subscriptions: Sequence[str]) -> None:
        """Change which message types are stored (SIGHUP)."""
        self._subscribed = frozenset(subscriptions)

    async def drain(self) -> None:
        """Answer new callbacks 503 and wait for those in progress to be answered."""
        self.draining = True
        await self._idle.wait()

    async def _answer(self, request: web.Request, remote: IPAddress | None) -> Answer:
        if self.draining:
            return _reject(503, "unavailable", "shutting down; retry later")
        if self._allowed and (remote is None or not _in_any(remote, self._allowed)):
            return _reject(403, "forbidden", "address not allowed")
        if not _JSON_TYPE.fullmatch(request.content_type or ""):
            return _reject(415, "unsupported_media_type", "Content-Type must be application/json")
        body = await self._read_body(request)
        if isinstance(body, Answer):
            return body
        if not self._authenticated(request, body):
            return _reject(401, "unauthenticated", "missing or invalid signature or token")
        url_type = request.match_info.get("message_type")
        headers = _kept_headers(request)
        try:
            messages = parse_body(body, url_type)
        except MalformedBody as exc:
            return await self._quarantine(body, exc.message, url_type, headers, remote)
        return await self._store_messages(messages, headers, remote)

    async def _read_body(self, request: web.Request) -> bytes | Answer:
        """The body; or the answer as soon as it is too large, too slow, or cut off."""
        if request.content_length is not None and request.content_length > self._max_body:
            return self._too_large()
        content = request.content
        chunks: list[bytes] = []
        size = 0
        try:
            if content.is_eof():
                # The whole body came with the headers, as a callback almost always does:
                # take it without a timer and a read loop. The reader stops taking bytes
                # from the socket near its buffer limit, so what it holds is bounded.
                body = content.read_nowait()
                return body if len(body) <= self._max_body else self._too_large()
            async with asyncio.timeout(BODY_TIMEOUT):
                async for chunk in content.iter_chunked(_READ_CHUNK):
                    size += len(chunk)
                    if size > self._max_body:
                        return self._too_large()
                    chunks.append(chunk)
        except TimeoutError:
            return _reject(408, "timeout", f"body not received within {BODY_TIMEOUT:g} s")
        except ConnectionError:
            # The client went away mid-body: nothing to store and nobody to answer.
            return _reject(400, "incomplete", "connection closed before the body ended")
        return b"".join(chunks)

    def _too_large(self) -> Answer:
        return _reject(413, "too_large", f"body exceeds {self._max_body} bytes")

    def _authenticated(self, request: web.Request, body: bytes) -> bool:
        if self._unauthenticated:
            return True
        # Every configured mechanism must pass: configuring a token and a secret asks for both.
        signed = not self._secrets or signature_valid(
            body, request.headers.get("X-MasonHub-Signature"), self._secrets
        )
        tokened = not self._token or token_valid(request.headers, self._token)
        return signed and tokened

    async def _quarantine(
        self,
        body: bytes,
        reason: str,
        url_type: str | None,
        headers: dict[str, str],
        remote: IPAddress | None,
    ) -> Answer:
        item = QuarantinedBody(
            # What the URL or the body said, made storable: NUL, say, is refused by PostgreSQL.
            reason=column_text(reason),
            body=body,
            received_at=datetime.now(UTC),
            message_type=None if url_type is None else column_text(url_type, MAX_TYPE_LENGTH),
            headers=headers,
            remote_addr=None if remote is None else str(remote),
        )
        try:
            await self._store.add_quarantine(item)
        except StoreUnavailable:
            # Not kept, so not answered as final: MasonHub will send it again.
            return _reject(503, "unavailable", "event store unavailable; retry later")
        return _reject(400, "malformed", reason)

    async def _store_messages(
        self,
        messages: list[ParsedMessage],
        headers: dict[str, str],
        remote: IPAddress | None,
    ) -> Answer:
        wanted = [m for m in messages if m.message_type in self._subscribed]
        ignored = len(messages) - len(wanted)
        if not wanted:
            return Answer(200, "ignored", messages=messages, ignored=ignored)
        now = datetime.now(UTC)
        rows = [_new_message(m, now, headers, remote) for m in wanted]
        try:
            is_new = await self._committer.submit(rows)
        except StoreUnavailable:
            return _reject(503, "unavailable", "event store unavailable; retry later")
        new = sum(is_new)
        outcome = "received" if new else "duplicate"
        return Answer(
            200,
            outcome,
            messages=messages,
            new=new,
            duplicates=len(wanted) - new,
            ignored=ignored,
        )


def _new_message(
    message: ParsedMessage,
    received_at: datetime,
    headers: dict[str, str],
    remote: IPAddress | None,
) -> NewMessage:
    return NewMessage(
        dedupe_key=message.dedupe_key,
        message_type=message.message_type,
        message_id=message.message_id,
        source="webhook",
        body=message.body,
        received_at=received_at,
        headers=headers,
        remote_addr=None if remote is None else str(remote),
    )


def _kept_headers(request: web.Request) -> dict[str, str]:
    kept = {name: request.headers[name] for name in _KEPT_HEADERS if name in request.headers}
    for name, value in request.headers.items():
        lower = name.lower()
        if lower.startswith("x-masonhub-") and lower not in _SECRET_HEADERS:
            kept[lower] = value
    return kept


def _log_answer(
    answer: Answer, request: web.Request, remote: IPAddress | None, elapsed: float
) -> None:
    first = answer.messages[0] if answer.messages else None
    fields: dict[str, Any] = {
        "outcome": answer.outcome,
        "status": answer.status,
        "path": request.path,
        "remote": None if remote is None else str(remote),
        "latency_ms": round(elapsed * 1000, 3),
    }
    if first is not None:
        fields.update(
            message_type=first.message_type,
            message_id=first.message_id,
            messages=len(answer.messages),
            new=answer.new,
            duplicates=answer.duplicates,
            ignored=answer.ignored,
        )
    if answer.error is not None:
        fields["error"] = answer.error
    if answer.status < 300:
        log_line("webhook.accepted", "info", fields)
    else:
        log_line("webhook.rejected", "warning", fields)


def add_routes(app: web.Application, settings: Settings, receiver: WebhookReceiver) -> None:
    """Mount the webhook endpoint at ``webhooks.path`` and ``webhooks.path/{message_type}``."""
    path = settings.webhooks.path
    app.router.add_post(path, receiver.handle)
    app.router.add_post(path + "/{message_type}", receiver.handle)
