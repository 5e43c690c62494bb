"""A faithful local MasonHub: its bulk API, its callback sender, and the faults webhooks have.

It serves the test suite, the benchmarks and ``syncd demo``::

    async with Simulator(seed=1, signing_secret="s3cret") as sim:
        sim.register_callback("http://127.0.0.1:8080/webhooks/masonhub", "orderEvent")
        order = sim.world.create_order()
        sim.world.advance(order.id, steps=4)      # open → … → fulfilled: callbacks go out
        await sim.sender.wait_idle()
        # GET {sim.base_url}/orders?sdt=… with sim.headers

``syncd simulate`` runs one alone on loopback for integrators.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncd.simulator.api import BASE_PATH, ApiError, ApiOptions, MasonHubApi, create_app
    from syncd.simulator.callbacks import (
        RETRY_DELAYS,
        Attempt,
        Callback,
        CallbackSender,
        Message,
        MessageState,
    )
    from syncd.simulator.server import DEFAULT_TOKEN, Simulator, start_simulator
    from syncd.simulator.tables import Search, Table, UpdateIndex
    from syncd.simulator.world import (
        Event,
        EventSink,
        Invalid,
        ManualClock,
        NotFound,
        Snapshot,
        SnapshotInProgress,
        World,
        WorldError,
        system_clock,
    )

#: Where each exported name lives. Loaded on first use, so that ``syncd --help`` (which
#: imports syncd.simulator.cli for its options) does not pay for aiohttp and the world.
_HOMES = {
    **dict.fromkeys(("BASE_PATH", "ApiError", "ApiOptions", "MasonHubApi", "create_app"), "api"),
    **dict.fromkeys(
        ("RETRY_DELAYS", "Attempt", "Callback", "CallbackSender", "Message", "MessageState"),
        "callbacks",
    ),
    **dict.fromkeys(("DEFAULT_TOKEN", "Simulator", "start_simulator"), "server"),
    **dict.fromkeys(("Search", "Table", "UpdateIndex"), "tables"),
    **dict.fromkeys(
        (
            "Event",
            "EventSink",
            "Invalid",
            "ManualClock",
            "NotFound",
            "Snapshot",
            "SnapshotInProgress",
            "World",
            "WorldError",
            "system_clock",
        ),
        "world",
    ),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = [
    "BASE_PATH",
    "DEFAULT_TOKEN",
    "RETRY_DELAYS",
    "ApiError",
    "ApiOptions",
    "Attempt",
    "Callback",
    "CallbackSender",
    "Event",
    "EventSink",
    "Invalid",
    "ManualClock",
    "MasonHubApi",
    "Message",
    "MessageState",
    "NotFound",
    "Search",
    "Simulator",
    "Snapshot",
    "SnapshotInProgress",
    "Table",
    "UpdateIndex",
    "World",
    "WorldError",
    "create_app",
    "start_simulator",
    "system_clock",
]
