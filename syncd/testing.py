"""Helpers for tests and benchmarks: signing callbacks, and a TCP proxy that can cut a link."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from syncd.erp import Delivery, DeliveryResult


def sign(body: bytes, secret: str, *, prefix: bool = True) -> str:
    """The ``X-MasonHub-Signature`` value MasonHub sends for ``body``."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}" if prefix else digest


def envelope(
    message_type: str, data: Any, message_id: str | None, *, callback_url: str = ""
) -> dict[str, Any]:
    """A MasonHub callback envelope."""
    body: dict[str, Any] = {
        "callback_url": callback_url,
        "message_type": message_type,
        "data": data,
    }
    if message_id is not None:
        body["message_id"] = message_id
    return body


def dumps(document: Any) -> bytes:
    """Compact JSON bytes, as a sender would put on the wire."""
    return json.dumps(document, separators=(",", ":")).encode()


class TcpProxy:
    """A loopback TCP proxy in front of a server, whose link can be cut and restored.

    Cutting closes every open connection and refuses new ones: from the client's side this is
    the server going down, without stopping the real server other tests share.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (``port`` 0: an ephemeral one, kept across restarts)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        """Listen again on the same port."""
        await self.start(self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        self._writers.difference_update((writer, up_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()


class RecordingErp:
    """An in-memory ERP adapter that accepts every delivery and remembers it, in order."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.closed = False

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Accept the delivery at once."""
        self.deliveries.append(delivery)
        return DeliveryResult(status=200, elapsed=0.0)

    async def close(self) -> None:
        """Nothing to release."""
        self.closed = True


@dataclass(frozen=True)
class ErpCall:
    """One request the local ERP received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


Responder = Callable[[ErpCall], Awaitable[web.StreamResponse | None]]


class LocalErp:
    """A local ERP (an aiohttp app) that records every call and keeps what it was told.

    ``respond`` may be set to script failures, delays or refusals: it gets each call and
    returns a response, or None for the default 200 that stores the body.
    """

    def __init__(self) -> None:
        self.calls: list[ErpCall] = []
        self.records: dict[str, Any] = {}
        self.respond: Responder | None = None
        self._in_flight: dict[str, int] = {}
        #: The most calls for one path that were ever in progress at once.
        self.max_concurrent_per_path = 0
        self._changed = asyncio.Event()

    def app(self) -> web.Application:
        """The aiohttp application to serve."""
        app = web.Application()
        app.router.add_put("/api/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        body = await request.json()
        call = ErpCall(request.method, request.path, dict(request.headers), body, loop.time())
        self.calls.append(call)
        self._in_flight[call.path] = self._in_flight.get(call.path, 0) + 1
        self.max_concurrent_per_path = max(self.max_concurrent_per_path, self._in_flight[call.path])
        try:
            response = await self.respond(call) if self.respond is not None else None
            if response is None:
                self.records[call.path] = body
                response = web.json_response({"ok": True})
            return response
        finally:
            self._in_flight[call.path] -= 1
            self._changed.set()

    def calls_to(self, path: str) -> list[ErpCall]:
        """The calls made to one path, in order."""
        return [c for c in self.calls if c.path == path]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds after some call, or fail after ``within`` s."""
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
