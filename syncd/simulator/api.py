"""The simulated MasonHub's bulk API: an aiohttp app with the OpenAPI file's paths and fields.

Everything is mounted under ``/api/v1`` (so a base URL looks like MasonHub's
``https://sandbox.masonhub.co/{slug}/api/v1``) and needs ``Authorization: Bearer <token>``.
GETs are searches with offset/limit paging (limit at most 100, default 30, at most 30 ids),
answered as bare JSON arrays, or with ``wrap_responses`` as the release notes' wrapper
``{"search_criteria", "limit", "offset", "list_type", "data"}``. Writes answer 200 with one
result per submitted record (success or failure each), as the spec's design notes say.
Errors are ``{"message": …}``.

Where the OpenAPI file contradicts itself the simulator follows its examples; the test
suite's schema validation says where (tests/test_simulator.py).
"""

from __future__ import annotations

import asyncio
import hmac
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from syncd.facts import parse_time
from syncd.simulator.callbacks import CallbackSender
from syncd.simulator.tables import Search
from syncd.simulator.world import (
    MESSAGE_TYPES,
    Invalid,
    SnapshotInProgress,
    World,
    WorldError,
)

log = structlog.get_logger(__name__)

BASE_PATH: Final = "/api/v1"
MAX_IDS: Final = 30
MAX_LIMIT: Final = 100
DEFAULT_LIMIT: Final = 30
MAX_RECORDS: Final = 30
#: Message types a hold may name (the spec's enum: snapshotReady cannot be held).
HOLDABLE: Final = tuple(t for t in MESSAGE_TYPES if t != "snapshotReady")
INBOUND_STATUSES: Final = ("open", "in-receiving", "received", "deleted")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Item = Mapping[str, Any]


class ApiError(Exception):
    """An error answer: ``{"message": …}`` (and MasonHub's ``code`` where it has one)."""

    def __init__(self, status: int, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message}
        if self.code is not None:
            body["code"] = self.code
        return web.json_response(body, status=self.status)


@dataclass(frozen=True)
class ApiOptions:
    """How the simulated API behaves."""

    token: str
    #: Answer GETs with the ``{"search_criteria", …, "data"}`` wrapper instead of bare arrays.
    wrap_responses: bool = False
    #: Seconds until a requested snapshot is ready; None leaves it to ``world.complete_snapshot``.
    snapshot_delay: float | None = 0.05
    base_path: str = BASE_PATH
    #: Share of API requests answered with a transient error instead (half 429 with
    #: ``Retry-After: fault_retry_after``, half 500), the faults a poller must ride out.
    fault_rate: float = 0.0
    fault_retry_after: int = 1
    fault_seed: int | str = 0


# --- query and body parsing ---------------------------------------------------------------------


def _values(request: web.Request, name: str) -> tuple[str, ...]:
    # The spec's examples write lists comma-separated; OpenAPI's form style repeats the key.
    values = [
        v.strip() for raw in request.query.getall(name, []) for v in raw.split(",") if v.strip()
    ]
    if len(values) > MAX_IDS:
        raise ApiError(400, f"{name}: at most {MAX_IDS} values may be given")
    return tuple(values)


def _integer(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name}: expected an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name}: must be {bounds}, got {value}")
    return value


def _time(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if not raw:
        return None
    moment = parse_time(raw)
    if moment is None:
        raise ApiError(400, f"{name}: expected an RFC 3339 date-time, got {raw!r}")
    return moment


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").strip().lower() in ("true", "1", "yes")


def _search(request: web.Request, **extra: Any) -> Search:
    return Search(
        ids=_values(request, "id"),
        cids=_values(request, "cid"),
        sdt=_time(request, "sdt"),
        edt=_time(request, "edt"),
        offset=_integer(request, "offset", 0, 0, None),
        limit=_integer(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        **extra,
    )


async def _records(request: web.Request, limit: int = MAX_RECORDS) -> list[Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, list):
        raise ApiError(400, "the body must be a JSON array of records")
    if len(body) > limit:
        raise ApiError(400, f"at most {limit} records may be sent at once")
    return body


def _number(item: Any, name: str) -> int:
    value = item.get(name) if isinstance(item, Mapping) else None
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise Invalid([(name, f"expected a number, got {value!r}")]) from None


def _text(item: Any, name: str) -> str:
    value = item.get(name) if isinstance(item, Mapping) else None
    if not isinstance(value, str) or not value.strip():
        raise Invalid([(name, "is required")])
    return value.strip()


# --- write results --------------------------------------------------------------------------------


def _success(key: str, **extra: Any) -> dict[str, Any]:
    return {"customer_identifier": key, "status": "success", **extra, "messages": []}


def _failure(key: str, error: WorldError) -> dict[str, Any]:
    problems = error.problems if isinstance(error, Invalid) else [(error.field_name, error.message)]
    return {
        "customer_identifier": key,
        "status": "failure",
        "messages": [{"field_name": f, "errors": [e]} for f, e in problems],
    }


def _results(results: Sequence[dict[str, Any]]) -> web.Response:
    failed = sum(1 for r in results if r["status"] == "failure")
    return web.json_response(
        [
            {
                "records_submitted": len(results),
                "records_processed": len(results),
                "records_failed": failed,
                "records_succeeded": len(results) - failed,
                "results": list(results),
            }
        ]
    )


async def _batch(
    request: web.Request, key_field: str, apply: Callable[[Any], dict[str, Any]]
) -> web.Response:
    """Apply ``apply`` to every record of the body; one result each, failures included."""
    results = []
    for item in await _records(request):
        key = item.get(key_field) if isinstance(item, Mapping) else None
        key = str(key) if key is not None else ""
        try:
            results.append(apply(item))
        except WorldError as exc:
            results.append(_failure(key, exc))
    return _results(results)


# --- middlewares ------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason).response()
    except Exception:
        # A simulator bug still answers like MasonHub does, and leaves its traceback in the log.
        log.exception("simulator.error", path=request.path)
        return ApiError(500, "Something went wrong.").response()


def _faults(options: ApiOptions, injected: Counter[int]) -> Middleware:
    # Determinism, not secrecy: a seed replays the same faults.
    rng = random.Random(f"{options.fault_seed}:api-faults")  # noqa: S311

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        if rng.random() >= options.fault_rate:
            return await handler(request)
        if rng.random() < 0.5:
            injected[429] += 1
            response = ApiError(429, "Too many requests.").response()
            response.headers["Retry-After"] = str(options.fault_retry_after)
            return response
        injected[500] += 1
        return ApiError(500, "Something went wrong.").response()

    return inject


def _auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "The access token provided is missing or invalid.")
        return await handler(request)

    return check


# --- the API ------------------------------------------------------------------------------------


class MasonHubApi:
    """The request handlers, over one world and one callback sender."""

    def __init__(self, world: World, sender: CallbackSender, options: ApiOptions) -> None:
        self.world = world
        self.sender = sender
        self.options = options
        #: The faults injected so far, by status (see ApiOptions.fault_rate).
        self.faults: Counter[int] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[web.RouteDef]:
        """Every route, under the base path."""
        base = self.options.base_path
        get, post, delete = web.get, web.post, web.delete
        return [
            get(f"{base}/orders", self.get_orders),
            post(f"{base}/orders", self.post_orders),
            get(f"{base}/shipments", self.get_shipments),
            get(f"{base}/skus", self.get_skus),
            get(f"{base}/sku_snapshots", self.get_sku_snapshots),
            post(f"{base}/snapshot_request", self.post_snapshot_request),
            get(f"{base}/snapshot_download/{{name}}", self.get_snapshot_download),
            get(f"{base}/inbound_shipments", self.get_inbound_shipments),
            get(f"{base}/rmas", self.get_rmas),
            get(f"{base}/callbacks", self.get_callbacks),
            post(f"{base}/callbacks", self.post_callbacks),
            delete(f"{base}/callbacks", self.delete_callbacks),
            get(f"{base}/callback_holds", self.get_callback_holds),
            post(f"{base}/callback_holds", self.post_callback_holds),
            delete(f"{base}/callback_holds", self.delete_callback_holds),
            post(f"{base}/data_factory/createAvailable", self.create_available),
            post(f"{base}/data_factory/loseInventory", self.lose_inventory),
            post(f"{base}/data_factory/shipOrder", self.ship_order),
            post(f"{base}/data_factory/orderShipment", self.order_shipment),
            post(f"{base}/data_factory/inboundShipmentEvent", self.inbound_shipment_event),
            post(f"{base}/data_factory/rmaEvent", self.rma_event),
        ]

    async def settle(self) -> None:
        """Wait for the snapshots being prepared to be ready."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Abandon snapshots still being prepared."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _page(self, request: web.Request, search: Search, data: list[Any]) -> web.Response:
        if not self.options.wrap_responses:
            return web.json_response(data)
        # As the release notes show it: every filter, null when not given.
        criteria: dict[str, Any] = {"sdt": None, "edt": None}
        criteria |= {k: v for k, v in request.query.items() if k not in ("offset", "limit")}
        return web.json_response(
            {
                "search_criteria": criteria,
                "limit": search.limit,
                "offset": search.offset,
                "list_type": "detail",
                "data": data,
            }
        )

    def _url(self, request: web.Request, path: str) -> str:
        return f"{request.url.origin()}{self.options.base_path}{path}"

    # --- orders and shipments ----------------------------------------------------------------

    async def get_orders(self, request: web.Request) -> web.Response:
        """``GET /orders``: id (and, beyond the spec, cid), sdt; list_type is ignored."""
        search = _search(request)
        records = [order.record() for order in self.world.orders.search(search)]
        return self._page(request, search, records)

    async def post_orders(self, request: web.Request) -> web.Response:
        """``POST /orders``: customer orders, each accepted or refused on its own."""

        def submit(item: Any) -> dict[str, Any]:
            if not isinstance(item, Mapping):
                raise Invalid([("", "each record must be an object")])
            order = self.world.submit_order(item)
            return _success(
                order.customer_identifier,
                id=order.id,
                url=self._url(request, f"/orders?id={order.id}"),
            )

        return await _batch(request, "customer_identifier", submit)

    async def get_shipments(self, request: web.Request) -> web.Response:
        """``GET /shipments``: id, coid (customer order ids), sdt, edt."""
        coids = _values(request, "coid")
        search = _search(request)
        if coids:
            orders = [self.world.orders.get(coid) for coid in coids]
            of_orders = [s.id for o in orders if o is not None for s in o.shipments]
            chosen = set(search.ids or of_orders)
            wanted = [i for i in of_orders if i in chosen]
            if not wanted:
                return self._page(request, search, [])
            search = replace(search, ids=wanted)
        records = [s.record() for s in self.world.shipments.search(search)]
        return self._page(request, search, records)

    # --- inventory ---------------------------------------------------------------------------

    async def get_skus(self, request: web.Request) -> web.Response:
        """``GET /skus``: id, cid, include_counts."""
        search = _search(request)
        counts = _flag(request, "include_counts")
        records = [s.record(include_counts=counts) for s in self.world.skus.search(search)]
        return self._page(request, search, records)

    async def get_sku_snapshots(self, request: web.Request) -> web.Response:
        """``GET /sku_snapshots``: cid (1 to 30; without it, beyond the spec, every SKU).

        Always the spec's wrapper object, with the bounded ledger as ``inventory_events``.
        """
        search = _search(request)
        records = [s.snapshot() for s in self.world.skus.search(search)]
        return web.json_response(
            {
                "include_ledger": True,
                "limit": search.limit,
                "offset": search.offset,
                "data": records,
            }
        )

    async def post_snapshot_request(self, request: web.Request) -> web.Response:
        """``POST /snapshot_request``: start a full snapshot; 400 (code 399) if one is pending."""
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, Mapping) or body.get("snapshot_type") != "full":
            raise ApiError(400, "snapshot_type: must be 'full'")
        try:
            snapshot = self.world.request_snapshot("full")
        except SnapshotInProgress as exc:
            raise ApiError(400, exc.message, code=exc.code) from None
        url = self._url(request, f"/snapshot_download/{snapshot.id}.json")
        if self.options.snapshot_delay is not None:
            task = asyncio.get_running_loop().create_task(
                self._complete_snapshot(url, self.options.snapshot_delay)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return _results([_success("full", system_id=snapshot.id)])

    async def _complete_snapshot(self, url: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self.world.complete_snapshot(url)

    async def get_snapshot_download(self, request: web.Request) -> web.Response:
        """``GET /snapshot_download/{id}.json``: a ready snapshot, a JSON array of sku snapshots."""
        snapshot_id = request.match_info["name"].removesuffix(".json")
        snapshot = self.world.snapshots.get(snapshot_id)
        if snapshot is None or not snapshot.ready:
            raise ApiError(404, "The record or records you are looking for could not be found.")
        return web.json_response(snapshot.skus)

    # --- inbound shipments and returns ----------------------------------------------------------

    def _status_filter(self, request: web.Request) -> Callable[[Any], bool] | None:
        statuses = {s for s in _values(request, "status") if s != "all"}
        if not statuses:
            return None
        return lambda record: record.status in statuses

    async def get_inbound_shipments(self, request: web.Request) -> web.Response:
        """``GET /inbound_shipments``: id, cid, status, sdt, edt."""
        search = _search(request, where=self._status_filter(request))
        records = [s.record() for s in self.world.inbound_shipments.search(search)]
        return self._page(request, search, records)

    async def get_rmas(self, request: web.Request) -> web.Response:
        """``GET /rmas``: id (and, beyond the spec, cid), status, sdt, edt."""
        search = _search(request, where=self._status_filter(request))
        records = [r.record() for r in self.world.rmas.search(search)]
        return self._page(request, search, records)

    # --- callbacks and holds -------------------------------------------------------------------

    async def get_callbacks(self, request: web.Request) -> web.Response:
        """``GET /callbacks``: the registrations, optionally of one message_type."""
        message_type = request.query.get("message_type") or None
        return web.json_response([c.record() for c in self.sender.registered(message_type)])

    async def post_callbacks(self, request: web.Request) -> web.Response:
        """``POST /callbacks``: register (or re-point) the callback of each message type."""

        def register(item: Any) -> dict[str, Any]:
            url = _text(item, "url")
            message_type = _text(item, "message_type")
            version = str(item.get("api_version") or "1.0")
            if message_type not in MESSAGE_TYPES:
                raise Invalid([("message_type", f"unknown message type {message_type!r}")])
            if version not in ("1.0", "2.0"):
                raise Invalid([("api_version", "must be '1.0' or '2.0'")])
            token = item.get("token")
            callback = self.sender.register(
                url, message_type, api_version=version, token=str(token) if token else None
            )
            return _success(
                callback.id,
                id=callback.id,
                message_type=message_type,
                url=self._url(request, f"/callbacks?message_type={message_type}"),
            )

        return await _batch(request, "message_type", register)

    async def delete_callbacks(self, request: web.Request) -> web.Response:
        """``DELETE /callbacks``: a JSON array of callback ids."""
        results = []
        for item in await _records(request):
            callback_id = str(item.get("id") if isinstance(item, Mapping) else item)
            if self.sender.unregister(callback_id):
                results.append(_success(callback_id, id=callback_id))
            else:
                results.append(_failure(callback_id, WorldError("callback not found")))
        return _results(results)

    async def get_callback_holds(self, request: web.Request) -> web.Response:
        """``GET /callback_holds``: the held message types."""
        return web.json_response(
            [
                {"message_type": message_type, "created_at": since.isoformat()}
                for message_type, since in self.sender.holds.items()
            ]
        )

    def _holdable(self, item: Any) -> str:
        message_type = _text(item, "message_type")
        if message_type not in HOLDABLE:
            raise Invalid([("message_type", f"cannot hold {message_type!r}")])
        return message_type

    async def post_callback_holds(self, request: web.Request) -> web.Response:
        """``POST /callback_holds``: hold message types until the hold is deleted."""

        def hold(item: Any) -> dict[str, Any]:
            message_type = self._holdable(item)
            self.sender.hold(message_type, self.world.now())
            return _success(message_type)

        return await _batch(request, "message_type", hold)

    async def delete_callback_holds(self, request: web.Request) -> web.Response:
        """``DELETE /callback_holds``: release message types; their queued messages go out."""

        def release(item: Any) -> dict[str, Any]:
            message_type = self._holdable(item)
            if not self.sender.release(message_type):
                raise Invalid([("message_type", f"{message_type!r} is not on hold")])
            return _success(message_type)

        return await _batch(request, "message_type", release)

    # --- data factory --------------------------------------------------------------------------

    async def create_available(self, request: web.Request) -> web.Response:
        """``POST /data_factory/createAvailable``: units appear as available."""

        def apply(item: Any) -> dict[str, Any]:
            sku = self.world.create_available(_text(item, "sku_id"), _number(item, "quantity"))
            return _success(sku.customer_identifier, id=sku.id)

        return await _batch(request, "sku_id", apply)

    async def lose_inventory(self, request: web.Request) -> web.Response:
        """``POST /data_factory/loseInventory``: available units become lost."""

        def apply(item: Any) -> dict[str, Any]:
            sku = self.world.lose_inventory(_text(item, "sku_id"), _number(item, "quantity"))
            return _success(sku.customer_identifier, id=sku.id)

        return await _batch(request, "sku_id", apply)

    async def ship_order(self, request: web.Request) -> web.Response:
        """``POST /data_factory/shipOrder``: ship an order (fulfillment ids are not modelled)."""

        def apply(item: Any) -> dict[str, Any]:
            shorts = item.get("shorts") if isinstance(item, Mapping) else None
            order = self.world.ship_order(
                _text(item, "order_customer_id"),
                shipping_provider=item.get("shipping_provider"),
                shipper_service_level=item.get("shipper_service_level"),
                shorts=[str(s) for s in shorts] if isinstance(shorts, list) else (),
                number_of_shipments=_number(item, "number_of_shipments") or None,
            )
            return _success(order.customer_identifier, id=order.id)

        return await _batch(request, "order_customer_id", apply)

    async def order_shipment(self, request: web.Request) -> web.Response:
        """``POST /data_factory/orderShipment``: a package reaches a carrier stage."""

        def apply(item: Any) -> dict[str, Any]:
            order = self.world.shipment_event(_text(item, "tracking_number"), _text(item, "event"))
            return _success(order.customer_identifier, id=order.id)

        return await _batch(request, "tracking_number", apply)

    async def inbound_shipment_event(self, request: web.Request) -> web.Response:
        """``POST /data_factory/inboundShipmentEvent``: onDock, receivingStarted, …Completed."""

        def apply(item: Any) -> dict[str, Any]:
            shipment = self.world.inbound_event(
                _text(item, "customer_identifier"),
                _text(item, "event"),
                randomize_receipt_qty=bool(item.get("randomize_receipt_qty")),
                randomize_inventory_statuses=bool(item.get("randomize_inventory_statuses")),
            )
            return _success(shipment.customer_identifier, id=shipment.id)

        return await _batch(request, "customer_identifier", apply)

    async def rma_event(self, request: web.Request) -> web.Response:
        """``POST /data_factory/rmaEvent``: a return's carrier stage or receipt."""

        def apply(item: Any) -> dict[str, Any]:
            rma = self.world.rma_event(
                _text(item, "customer_identifier"),
                str(item.get("event") or "receiveFull"),
                randomize_inventory_statuses=bool(item.get("randomize_inventory_statuses")),
            )
            return _success(rma.customer_identifier, id=rma.id)

        return await _batch(request, "customer_identifier", apply)


SIM_API = web.AppKey("simulator_api", MasonHubApi)


def create_app(world: World, sender: CallbackSender, options: ApiOptions) -> web.Application:
    """The simulated MasonHub: its API, and the callback sender started and stopped with it."""
    api = MasonHubApi(world, sender, options)
    middlewares = [_errors, _auth(options.token)]
    if options.fault_rate:
        middlewares.append(_faults(options, api.faults))
    app = web.Application(middlewares=middlewares)
    app[SIM_API] = api
    app.router.add_routes(api.routes())
    world.subscribe(sender)  # idempotent

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await sender.start()
        yield
        await api.close()
        await sender.close()

    app.cleanup_ctx.append(lifecycle)
    return app
