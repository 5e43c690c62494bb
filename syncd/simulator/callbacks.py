"""The simulated MasonHub's callback sender: signed POSTs, MasonHub's retries, real faults.

Each event the world publishes becomes one message per callback registered for its type:
the envelope ``{"callback_url", "message_type", "message_id", "data"}``, serialised once so
that every retry and duplicate sends the same bytes, the same ``message_id`` and the same
``X-MasonHub-Signature: sha256=<hex>`` (HMAC-SHA256 of the body). A callback's registered
token is sent as ``Authorization: Bearer <token>``: the OpenAPI file says only that the token
is "sent with all outgoing instances", so where it goes is this simulator's choice (syncd
also accepts it as ``X-MasonHub-Token``).

Retries follow the integration guide: after 1 min, 5 min, 15 min and 1 h (scaled by
``time_factor``) on a connection error, a timeout or any answer but 2xx and 4xx; a 4xx means
"do not retry". Faults are drawn from a seeded generator, four draws per message whatever
the knobs, so turning one fault on does not change the message ids of the others.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

import aiohttp

from syncd.simulator.world import Event
from syncd.testing import sign

#: The guide's retry schedule, in seconds (before ``time_factor``).
RETRY_DELAYS: Final = (60.0, 300.0, 900.0, 3600.0)
USER_AGENT: Final = "MasonHub-Simulator/1.0 (syncd)"
ANSWER_EXCERPT: Final = 500


class MessageState(StrEnum):
    """Where a callback message is."""

    QUEUED = "queued"  # waiting for its start delay, a burst, a retry, or the sender to start
    HELD = "held"  # its message type is on hold
    SENDING = "sending"
    DELIVERED = "delivered"  # some copy got a 2xx
    REJECTED = "rejected"  # a 4xx: not retried
    FAILED = "failed"  # every retry failed
    DROPPED = "dropped"  # the drop fault: never sent


_FINAL: Final = frozenset(
    {MessageState.DELIVERED, MessageState.REJECTED, MessageState.FAILED, MessageState.DROPPED}
)


@dataclass(frozen=True)
class Callback:
    """A callback registration: MasonHub POSTs one message type to ``url``."""

    id: str
    url: str
    message_type: str
    api_version: str = "1.0"
    token: str | None = None

    def record(self) -> dict[str, Any]:
        """The registration as ``GET /callbacks`` lists it."""
        record: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "message_type": self.message_type,
            "api_version": self.api_version,
        }
        if self.token:
            record["token"] = self.token
        return record


@dataclass(eq=False)
class Message:
    """One callback message and what became of it: an audit line for tests and the demo."""

    message_id: str
    message_type: str
    entity_key: str
    callback: Callback
    body: bytes
    state: MessageState = MessageState.QUEUED
    #: 2 when the duplicate fault sends it twice (same bytes, same message_id).
    copies: int = 1
    #: HTTP POSTs made, over every copy and retry.
    attempts: int = 0
    #: Each attempt's status code, or the name of its connection error.
    responses: list[int | str] = field(default_factory=list)
    #: Seconds each copy waited before its first attempt (the delay and reorder faults).
    start_delays: tuple[float, ...] = ()

    @property
    def envelope(self) -> Any:
        """The JSON that was (or will be) sent."""
        return json.loads(self.body)

    def settle(self, state: MessageState) -> None:
        """Record an outcome; a delivery stands whatever another copy meets later."""
        if self.state is not MessageState.DELIVERED:
            self.state = state


@dataclass(frozen=True)
class Attempt:
    """One HTTP POST of a message, as the sent log records it."""

    message_id: str
    message_type: str
    entity_key: str
    url: str
    copy: int
    number: int
    status: int | None
    error: str | None
    at: float
    #: The start of the answer's body (for audits: syncd answers {"status": "received"}).
    answer: str = ""


@dataclass
class _Hold:
    since: datetime
    released: asyncio.Event = field(default_factory=asyncio.Event)
    #: Copies waiting for the release.
    parked: int = 0


class CallbackSender:
    """Posts the world's events to registered callbacks, exactly as MasonHub does, with faults.

    Faults: ``drop_rate`` (the message is never sent), ``duplicate_rate`` (sent twice, same
    message_id), ``reorder_window`` (each copy waits a random 0..window seconds first, so
    messages can arrive out of order), ``delay`` (every copy waits that long first), ``burst``
    (messages accumulate until ``burst`` of them are ready or :meth:`flush`, then go out at
    once, concurrently). A held message type queues until its hold is removed.

    Audit: ``messages`` (every message, in publish order, with its state), ``sent`` (every
    POST made), and the ``delivered``, ``dropped``, ``failed``, ``rejected`` views.
    """

    def __init__(
        self,
        *,
        signing_secret: str | None = None,
        seed: int | str = 0,
        time_factor: float = 1.0,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        reorder_window: float = 0.0,
        delay: float = 0.0,
        burst: int = 0,
        array_bodies: bool = False,
        signature_prefix: bool = True,
        request_timeout: float = 10.0,
        connection_limit: int = 100,
    ) -> None:
        self.signing_secret = signing_secret
        # Determinism, not secrecy: a seed replays the same message ids and faults.
        self.rng = random.Random(f"{seed}:callbacks")  # noqa: S311
        self.time_factor = time_factor
        self.retry_delays = tuple(retry_delays)
        self.drop_rate = drop_rate
        self.duplicate_rate = duplicate_rate
        self.reorder_window = reorder_window
        self.delay = delay
        self.burst = burst
        #: Send each envelope inside a JSON array, the shape the spec's schemas give.
        self.array_bodies = array_bodies
        self.signature_prefix = signature_prefix
        self.request_timeout = request_timeout
        self.connection_limit = connection_limit
        self.callbacks: dict[str, Callback] = {}
        self.messages: list[Message] = []
        self.sent: list[Attempt] = []
        self._holds: dict[str, _Hold] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: list[tuple[Message, int, float]] = []
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- registrations and holds -------------------------------------------------------------

    def register(
        self,
        url: str,
        message_type: str,
        *,
        api_version: str = "1.0",
        token: str | None = None,
        replace: bool = True,
    ) -> Callback:
        """Register (or, with ``replace``, re-point) the callback of a message type."""
        existing = self.registered(message_type) if replace else []
        callback_id = existing[0].id if existing else str(uuid.UUID(int=self._bits(), version=4))
        for old in existing:
            del self.callbacks[old.id]
        callback = Callback(callback_id, url, message_type, api_version, token or None)
        self.callbacks[callback.id] = callback
        return callback

    def unregister(self, callback_id: str) -> bool:
        """Remove a registration; False if there was none with that id."""
        return self.callbacks.pop(callback_id, None) is not None

    def registered(self, message_type: str | None = None) -> list[Callback]:
        """The registrations, of one message type or all."""
        return [c for c in self.callbacks.values() if message_type in (None, c.message_type)]

    def hold(self, message_type: str, since: datetime) -> None:
        """Queue messages of this type (new and retried) until :meth:`release`."""
        self._holds.setdefault(message_type, _Hold(since))

    def release(self, message_type: str) -> bool:
        """Remove a hold: its queued messages go out, in order. False if there was none."""
        hold = self._holds.pop(message_type, None)
        if hold is None:
            return False
        # Counted busy now, not when they wake: a wait_idle right after must wait for them.
        self._busy += hold.parked
        if hold.parked:
            self._idle.clear()
        hold.released.set()
        return True

    @property
    def holds(self) -> dict[str, datetime]:
        """The held message types and since when."""
        return {message_type: hold.since for message_type, hold in self._holds.items()}

    # --- the world's event sink ----------------------------------------------------------------

    def wants(self, message_type: str) -> bool:
        """True if some callback is registered for the type."""
        return any(c.message_type == message_type for c in self.callbacks.values())

    def publish(self, event: Event) -> None:
        """Turn an event into one message per registration and send them (never blocks)."""
        for callback in self.registered(event.message_type):
            self._publish_to(event, callback)

    def _bits(self) -> int:
        return self.rng.getrandbits(128)

    def _publish_to(self, event: Event, callback: Callback) -> None:
        message_id = str(uuid.UUID(int=self._bits(), version=4))
        drop, duplicate, *jitters = (self.rng.random() for _ in range(4))
        data = event.data_v2 if callback.api_version == "2.0" and event.data_v2 else event.data
        envelope: dict[str, Any] = {
            "callback_url": callback.url,
            "message_type": event.message_type,
            "message_id": message_id,
            "data": data,
        }
        if event.message_type == "rmaEvent":
            envelope["api_version"] = callback.api_version
        document: Any = [envelope] if self.array_bodies else envelope
        body = json.dumps(document, separators=(",", ":")).encode()
        message = Message(message_id, event.message_type, event.entity_key, callback, body)
        self.messages.append(message)
        if drop < self.drop_rate:
            message.state = MessageState.DROPPED
            return
        message.copies = 2 if duplicate < self.duplicate_rate else 1
        message.start_delays = tuple(
            self.delay + jitters[copy] * self.reorder_window for copy in range(message.copies)
        )
        for copy, start_delay in enumerate(message.start_delays):
            self._waiting.append((message, copy, start_delay))
        if self.burst <= 0 or len(self._waiting) >= self.burst:
            self.flush()

    def flush(self) -> int:
        """Start every waiting message now (all at once: a burst); the copies started."""
        if self._session is None:
            return 0  # started by start()
        waiting, self._waiting = self._waiting, []
        for message, copy, start_delay in waiting:
            self._busy += 1
            self._idle.clear()
            task = asyncio.get_running_loop().create_task(
                self._deliver(message, copy, start_delay),
                name=f"callback:{message.message_id}:{copy}",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(waiting)

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session and send what was published before."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connection_limit),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                headers={"User-Agent": USER_AGENT},
            )
        if self.burst <= 0 or len(self._waiting) >= self.burst:
            self.flush()

    async def close(self) -> None:
        """Stop sending (in-flight, queued and retrying messages are abandoned)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> CallbackSender:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def wait_idle(self, within: float = 10.0) -> None:
        """Wait until nothing is being sent or awaiting a retry.

        Messages parked on a hold, or waiting for a burst to fill, do not count; TimeoutError
        after ``within`` seconds.
        """
        async with asyncio.timeout(within):
            await self._idle.wait()

    # --- delivery ------------------------------------------------------------------------------

    async def _deliver(self, message: Message, copy: int, start_delay: float) -> None:
        try:
            if start_delay > 0:
                await asyncio.sleep(start_delay)
            delays = iter(self.retry_delays)
            while True:
                await self._wait_for_release(message)
                outcome = await self._post(message, copy)
                if outcome is not None:
                    message.settle(outcome)
                    return
                delay = next(delays, None)
                if delay is None:
                    message.settle(MessageState.FAILED)
                    return
                message.settle(MessageState.QUEUED)
                await asyncio.sleep(delay * self.time_factor)
        finally:
            self._finished()

    def _finished(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def _wait_for_release(self, message: Message) -> None:
        hold = self._holds.get(message.message_type)
        while hold is not None:
            message.settle(MessageState.HELD)
            hold.parked += 1
            # A parked message is not work in progress: wait_idle must not wait for a release.
            self._finished()
            try:
                await hold.released.wait()
            except asyncio.CancelledError:
                self._busy += 1  # balances the decrement of _deliver's finally
                raise
            hold = self._holds.get(message.message_type)

    async def _post(self, message: Message, copy: int) -> MessageState | None:
        """One attempt: DELIVERED, REJECTED, or None to retry."""
        assert self._session is not None
        message.settle(MessageState.SENDING)
        message.attempts += 1
        headers = {"Content-Type": "application/json"}
        if self.signing_secret:
            headers["X-MasonHub-Signature"] = sign(
                message.body, self.signing_secret, prefix=self.signature_prefix
            )
        if message.callback.token:
            headers["Authorization"] = f"Bearer {message.callback.token}"
        status: int | None = None
        error: str | None = None
        answer = ""
        try:
            async with self._session.post(
                message.callback.url, data=message.body, headers=headers
            ) as response:
                status = response.status
                answer = (await response.read())[:ANSWER_EXCERPT].decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = type(exc).__name__
        message.responses.append(status if status is not None else str(error))
        self.sent.append(
            Attempt(
                message.message_id,
                message.message_type,
                message.entity_key,
                message.callback.url,
                copy,
                message.attempts,
                status,
                error,
                asyncio.get_running_loop().time(),
                answer,
            )
        )
        if status is None:
            return None
        if 200 <= status < 300:
            return MessageState.DELIVERED
        return MessageState.REJECTED if 400 <= status < 500 else None

    # --- audit views -----------------------------------------------------------------------------

    def _in(self, state: MessageState) -> list[Message]:
        return [m for m in self.messages if m.state is state]

    @property
    def delivered(self) -> list[Message]:
        """Messages some copy of which got a 2xx."""
        return self._in(MessageState.DELIVERED)

    @property
    def dropped(self) -> list[Message]:
        """Messages the drop fault never sent."""
        return self._in(MessageState.DROPPED)

    @property
    def failed(self) -> list[Message]:
        """Messages that used up every retry."""
        return self._in(MessageState.FAILED)

    @property
    def rejected(self) -> list[Message]:
        """Messages answered 4xx (not retried)."""
        return self._in(MessageState.REJECTED)

    def states(self) -> Counter[str]:
        """How many messages are in each state."""
        return Counter(m.state.value for m in self.messages)

    def posts_of(self, message_id: str) -> Iterator[Attempt]:
        """Every POST of one message."""
        return (a for a in self.sent if a.message_id == message_id)

    @property
    def settled(self) -> bool:
        """True when every message is delivered, rejected, failed or dropped."""
        return all(m.state in _FINAL for m in self.messages)
