"""A running simulated MasonHub: world, API and callback sender, on a loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from syncd.simulator.api import BASE_PATH, SIM_API, ApiOptions, MasonHubApi, create_app
from syncd.simulator.callbacks import RETRY_DELAYS, Callback, CallbackSender
from syncd.simulator.world import Clock, World

if TYPE_CHECKING:
    from aiohttp.test_utils import TestServer

#: A loopback simulator's well-known default, not a secret.
DEFAULT_TOKEN: Final = "simulator-token"  # noqa: S105


class Simulator:
    """A local MasonHub: the :class:`World`, its bulk API, and its :class:`CallbackSender`.

    Serve it with :meth:`start` (or ``async with``), or hand :attr:`app` to pytest-aiohttp
    (see :func:`start_simulator`). Point a client at :attr:`base_url` with
    :attr:`headers`. The fault knobs are the sender's; they may also be changed later on
    ``simulator.sender`` (``drop_rate``, ``duplicate_rate``, ``reorder_window``, …).
    ``api_fault_rate`` answers that share of API requests 429 or 500 instead.
    """

    def __init__(
        self,
        *,
        seed: int | str = 0,
        token: str = DEFAULT_TOKEN,
        signing_secret: str | None = None,
        clock: Clock | None = None,
        skus: int = 20,
        initial_units: int = 1000,
        wrap_responses: bool = False,
        snapshot_delay: float | None = 0.05,
        camel_case_order_events: bool = True,
        time_factor: float = 1.0,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        reorder_window: float = 0.0,
        delay: float = 0.0,
        burst: int = 0,
        array_bodies: bool = False,
        api_fault_rate: float = 0.0,
        api_fault_retry_after: int = 1,
    ) -> None:
        self.token = token
        self.world = World(
            seed,
            clock=clock,
            skus=skus,
            initial_units=initial_units,
            camel_case_order_events=camel_case_order_events,
        )
        self.sender = CallbackSender(
            signing_secret=signing_secret,
            seed=seed,
            time_factor=time_factor,
            retry_delays=retry_delays,
            drop_rate=drop_rate,
            duplicate_rate=duplicate_rate,
            reorder_window=reorder_window,
            delay=delay,
            burst=burst,
            array_bodies=array_bodies,
        )
        options = ApiOptions(
            token,
            wrap_responses=wrap_responses,
            snapshot_delay=snapshot_delay,
            fault_rate=api_fault_rate,
            fault_retry_after=api_fault_retry_after,
            fault_seed=seed,
        )
        self.app = create_app(self.world, self.sender, options)
        self.api: MasonHubApi = self.app[SIM_API]
        #: ``http://HOST:PORT/api/v1`` once serving.
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The headers an API client must send."""
        return {"Authorization": f"Bearer {self.token}"}

    def register_callback(
        self, url: str, message_type: str, *, api_version: str = "1.0", token: str | None = None
    ) -> Callback:
        """Register a callback, as ``POST /callbacks`` would."""
        return self.sender.register(url, message_type, api_version=api_version, token=token)

    async def wait_idle(self, within: float = 10.0) -> None:
        """Wait until requested snapshots are ready and no callback is in flight or retrying."""
        async with asyncio.timeout(within):
            await self.api.settle()
            await self.sender.wait_idle(within)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: an ephemeral port); returns the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.base_url = f"http://{bound_host}:{bound[1]}{BASE_PATH}"
        return self.base_url

    async def close(self) -> None:
        """Stop serving and sending."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


ServerFactory = Callable[..., Awaitable["TestServer"]]


async def start_simulator(aiohttp_server: ServerFactory, **options: Any) -> Simulator:
    """A :class:`Simulator` served by pytest-aiohttp's ``aiohttp_server`` fixture.

    ``options`` are the :class:`Simulator` constructor's; the server (and the sender's
    session) is stopped by the fixture at the end of the test.
    """
    simulator = Simulator(**options)
    server = await aiohttp_server(simulator.app)
    simulator.base_url = str(server.make_url(BASE_PATH))
    return simulator
