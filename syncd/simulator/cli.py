"""``syncd simulate``: a simulated MasonHub alone on loopback, for integrators and demos."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING, TextIO

import structlog

from syncd.config import Settings
from syncd.errors import SyncdError
from syncd.logs import configure_logging

if TYPE_CHECKING:
    from syncd.simulator.server import Simulator

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8081


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``syncd simulate``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    parser.add_argument("--token", help="API bearer token (default: masonhub.token)")
    parser.add_argument(
        "--signing-secret",
        help="HMAC secret callbacks are signed with (default: the first webhooks.signing_secrets)",
    )
    parser.add_argument("--seed", default="0", help="seed of the simulated world (default 0)")
    parser.add_argument("--orders", type=int, default=0, help="orders to create at start")
    parser.add_argument(
        "--wrap", action="store_true", help='answer GETs with the {"data": [...]} wrapper'
    )


def simulate(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """Run the simulator until SIGINT or SIGTERM; print its base URL first."""
    from syncd.cli import UsageError
    from syncd.simulator.server import Simulator

    token = args.token or settings.masonhub.token.get_secret_value()
    if not token:
        raise UsageError("simulate: no API token: give --token or set masonhub.token")
    secrets = [s.get_secret_value() for s in settings.webhooks.signing_secrets]
    secret = args.signing_secret or (secrets[0] if secrets else None)
    if args.orders < 0:
        raise UsageError(f"--orders: must be 0 or more, got {args.orders}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: must be between 0 and 65535, got {args.port}")
    configure_logging(debug=args.debug, secrets=[v for v in (token, secret) if v])
    simulator = Simulator(
        seed=args.seed, token=token, signing_secret=secret, wrap_responses=args.wrap
    )
    asyncio.run(_serve(simulator, args.host, args.port, args.orders, out))
    return 0


async def _serve(simulator: Simulator, host: str, port: int, orders: int, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        simulator.world.create_orders(orders)
        try:
            base_url = await simulator.start(host, port)
        except OSError as exc:
            raise SyncdError(f"simulate: cannot listen on {host}:{port}: {exc.strerror}") from exc
        # Only the URL on stdout, so a script can read it; the rest goes to the log.
        print(base_url, file=out, flush=True)
        log.info("simulator.listening", base_url=base_url, orders=orders)
        await stop.wait()
        log.info("simulator.stopping")
    finally:
        await simulator.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
