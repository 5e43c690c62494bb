"""The ERP port: what a delivery is, the adapter Protocol, and loading adapters by name.

Adapters plug in through the ``syncd.erp_adapters`` entry-point group; each entry point is a
factory called with the `ErpSettings` and returning an `ErpAdapter`. The bundled one is
``http`` (`syncd.erp.http.HttpErpAdapter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Final, Protocol, runtime_checkable

from syncd.config import ErpSettings
from syncd.errors import ConfigError

__all__ = [
    "DEFAULT_PATHS",
    "ENTITY_TYPES",
    "ENTRY_POINT_GROUP",
    "Delivery",
    "DeliveryResult",
    "ErpAdapter",
    "load_adapter",
]

ENTRY_POINT_GROUP: Final = "syncd.erp_adapters"
ENTITY_TYPES: Final = ("order", "inventory", "inbound_shipment", "return", "order_request")
# entity type -> (its key under [erp.paths], the path used when that key is not set)
DEFAULT_PATHS: Final[Mapping[str, tuple[str, str]]] = {
    "order": ("orders", "/orders/{id}"),
    "inventory": ("inventory", "/inventory/{id}"),
    "inbound_shipment": ("inbound_shipments", "/inbound-shipments/{id}"),
    "return": ("returns", "/returns/{id}"),
    "order_request": ("order_requests", "/order-requests/{id}"),
}


@dataclass(frozen=True)
class Delivery:
    """One entity's full current state, to be PUT to the ERP."""

    entity_type: str
    entity_key: str
    """The ERP's own identifier (customer_identifier); adapters quote it into URLs."""
    payload: Mapping[str, Any]
    idempotency_key: str
    source: str
    """Why it is delivered: "webhook", "poll" or "reconcile"."""
    replay: bool = False


@dataclass(frozen=True)
class DeliveryResult:
    """The ERP accepted a delivery: its status code and how long the call took (seconds)."""

    status: int
    elapsed: float


@runtime_checkable
class ErpAdapter(Protocol):
    """Sends deliveries to an ERP.

    `deliver` raises `TransientDeliveryError` for failures worth retrying later and
    `PermanentDeliveryError` for refusals; the delivery layer owns the retry schedule.
    """

    async def deliver(self, delivery: Delivery) -> DeliveryResult: ...

    async def close(self) -> None: ...


def load_adapter(settings: ErpSettings) -> ErpAdapter:
    """Build the adapter named by ``erp.adapter``; raise ConfigError naming that key."""
    name = settings.adapter
    found = entry_points(group=ENTRY_POINT_GROUP)
    matches = [ep for ep in found if ep.name == name]
    if not matches:
        installed = ", ".join(sorted({ep.name for ep in found})) or "none"
        raise ConfigError("erp.adapter", f"unknown adapter {name!r} (installed: {installed})")
    try:
        factory = matches[0].load()
    except Exception as exc:  # a broken plugin is a configuration problem, not a crash
        raise ConfigError("erp.adapter", f"cannot load adapter {name!r}: {exc}") from exc
    try:
        adapter = factory(settings)
    except ConfigError:
        raise  # it already names the key at fault
    except Exception as exc:
        raise ConfigError("erp.adapter", f"adapter {name!r} failed to start: {exc}") from exc
    if not isinstance(adapter, ErpAdapter):
        raise ConfigError("erp.adapter", f"adapter {name!r} has no deliver() and close()")
    return adapter
