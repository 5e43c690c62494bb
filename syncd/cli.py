"""The ``syncd`` command line: one-line errors, exit 0 / 1 / 2 as DESIGN.md says."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.engine import make_url

from syncd import __version__
from syncd.config import (
    Settings,
    default_config_path,
    load_settings,
    parse_duration,
    render_settings,
    startup_problems,
    startup_warnings,
)
from syncd.errors import ConfigError, SyncdError
from syncd.facts import parse_time
from syncd.logs import configure_logging
from syncd.store import SqlStore

Command = Callable[[argparse.Namespace], int]


class UsageError(SyncdError):
    """The command line is wrong."""

    exit_code = 2


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.config) if args.config else default_config_path()
    return load_settings(path)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, for the log redactor."""
    values = [s.get_secret_value() for s in settings.webhooks.signing_secrets]
    values += [
        settings.webhooks.callback_token.get_secret_value(),
        settings.masonhub.token.get_secret_value(),
        settings.erp.token.get_secret_value(),
    ]
    password = make_url(settings.store.url).password
    if password:
        values.append(str(password))
    return [v for v in values if v]


def cmd_check_config(args: argparse.Namespace) -> int:
    """Print the effective configuration with secrets masked."""
    settings = _settings(args)
    sys.stdout.write(render_settings(settings))
    problems = startup_problems(settings)
    for problem in problems:
        print(f"syncd: error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the event store's schema to this version."""
    settings = _settings(args)

    async def migrate() -> str:
        store = SqlStore(settings.store.url)
        try:
            before = await store.schema_status()
            after = await store.migrate()
        finally:
            await store.close()
        if before.current == after.current:
            return f"schema already at revision {', '.join(after.current)}"
        was = ", ".join(before.current) or "empty"
        return f"schema migrated to revision {', '.join(after.current)} (was {was})"

    print(asyncio.run(migrate()))
    return 0


#: The daemon's GIL switch interval (Python's default is 5 ms). The SQLite store thread runs
#: merges and delivery claims in Python; while it does, the event loop waits up to one
#: interval each time it needs the GIL back, and a webhook's answer needs it several times.
#: Measured at 2,274 webhooks/s (bench/RESULTS.md): ack p99.9 fell from 63-116 ms to 54-62 ms.
SWITCH_INTERVAL = 0.001


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    from syncd.app import serve

    settings = _settings(args)
    problems = startup_problems(settings)
    if problems:
        raise ConfigError("webhooks", "; ".join(problems))
    configure_logging(debug=args.debug, secrets=secrets_of(settings))
    for warning in startup_warnings(settings):
        structlog.get_logger("syncd").warning("config.warning", detail=warning)
    path = Path(args.config) if args.config else default_config_path()
    sys.setswitchinterval(SWITCH_INTERVAL)
    asyncio.run(serve(settings, reload=lambda: load_settings(path)))
    return 0


def _since(text: str | None) -> datetime | None:
    """``--since``: a duration back from now ("2h") or an RFC 3339 time."""
    if text is None:
        return None
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    moment = parse_time(text)
    if moment is None:
        raise UsageError(f"--since: expected a duration like 2h or an RFC 3339 time, got {text!r}")
    return moment


def _with_store(args: argparse.Namespace, work: Callable[[SqlStore], Awaitable[int]]) -> int:
    settings = _settings(args)

    async def run() -> int:
        store = SqlStore(settings.store.url)
        try:
            await store.require_current_schema()
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_events(args: argparse.Namespace) -> int:
    """List, show and replay received messages and their deliveries."""
    from syncd import events

    if args.events_command == "list":
        since = _since(args.since)
        return _with_store(
            args, lambda store: events.list_events(store, args.state, args.type, since, args.limit)
        )
    if args.events_command == "show":
        return _with_store(args, lambda store: events.show_event(store, args.id))
    if args.id is None and not args.dead:
        raise UsageError("events replay: give an event ID or --dead")
    since = _since(args.since)
    return _with_store(args, lambda store: events.replay(store, args.id, args.dead, since))


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole system on loopback: simulator, local ERP, daemon; exit 0 if they match."""
    from syncd.demo import run_demo

    if args.orders < 1 or args.duration <= 0:
        raise UsageError("demo: --orders must be at least 1 and --duration positive")
    ok = asyncio.run(run_demo(orders=args.orders, duration=args.duration, seed=args.seed))
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Queue depths, dead letters, poll freshness; exit 1 when something needs a person."""
    from syncd import status

    settings = _settings(args)

    async def work(store: SqlStore) -> int:
        report = await status.collect(store, settings)
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            sys.stdout.write(status.render_text(report))
        return 1 if report["problems"] else 0

    return _with_store(args, work)


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Run one reconciliation pass now and print its report."""
    from syncd.masonhub import MasonHubClient
    from syncd.poller import JOBS, PassFailed, PassReport, Poller, polling_problem

    settings = _settings(args)
    problem = polling_problem(settings)
    if problem is not None:
        raise ConfigError("masonhub", problem)
    jobs = JOBS if args.job == "all" else (args.job,)
    tty = sys.stdout.isatty()

    def progress(report: PassReport) -> None:
        if tty:
            sys.stdout.write(f"\r{report.job}: {report.records} records read, {report.new} changed")
            sys.stdout.flush()

    async def work(store: SqlStore) -> int:
        client = MasonHubClient(settings.masonhub)
        poller = Poller(store, client, settings)
        failed = 0
        try:
            for job in jobs:
                try:
                    report = await poller.reconcile(job, progress)
                except PassFailed as exc:
                    failed += 1
                    print(("\r" if tty else "") + f"syncd: error: {exc.message}", file=sys.stderr)
                    continue
                print(("\r" if tty else "") + report.line())
                for key in report.redelivered:
                    print(f"  re-delivering order {key}: its tracking numbers were not delivered")
        finally:
            await client.close()
        pending = (await store.outbox_counts()).get("pending", 0)
        print(f"{pending} deliveries pending; the running daemon sends them")
        return 1 if failed else 0

    return _with_store(args, work)


def cmd_subscriptions(args: argparse.Namespace) -> int:
    """Show or sync MasonHub's callback registrations with webhooks.subscriptions."""
    from syncd.masonhub import MasonHubClient
    from syncd.poller import polling_problem
    from syncd.subscriptions import list_subscriptions, sync_subscriptions

    settings = _settings(args)
    problem = polling_problem(settings)
    if problem is not None:
        raise ConfigError("masonhub", problem)

    async def run() -> int:
        client = MasonHubClient(settings.masonhub)
        try:
            if args.subscriptions_command == "list":
                return await list_subscriptions(settings, client)
            return await sync_subscriptions(settings, client, dry_run=args.dry_run)
        finally:
            await client.close()

    return asyncio.run(run())


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a simulated MasonHub (API and callbacks) on loopback until SIGINT or SIGTERM."""
    from syncd.simulator.cli import simulate

    return simulate(args, _settings(args))


def _add_events_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("events", parents=[common], help=cmd_events.__doc__)
    parser.set_defaults(func=cmd_events)
    sub = parser.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", parents=[common], help="received messages, newest first")
    listing.add_argument("--state", choices=["pending", "failed", "dead", "done"])
    listing.add_argument("--type", metavar="MESSAGE_TYPE")
    listing.add_argument("--since", metavar="WHEN", help="a duration back (2h) or a time")
    listing.add_argument("--limit", type=int, default=100)
    show = sub.add_parser("show", parents=[common], help="a message, its facts and deliveries")
    show.add_argument("id", type=int, metavar="ID")
    replay = sub.add_parser(
        "replay", parents=[common], help="deliver an event's entities (or all dead) again"
    )
    replay.add_argument("id", type=int, nargs="?", metavar="ID")
    replay.add_argument("--dead", action="store_true", help="every dead-lettered entity")
    replay.add_argument("--since", metavar="WHEN", help="with --dead: dead-lettered since")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--config`` and ``--debug`` work before or after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $SYNCD_CONFIG, else /etc/syncd/syncd.toml, "
        "else config/syncd.toml)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging, and tracebacks on errors",
    )
    parser = argparse.ArgumentParser(
        prog="syncd", description="Keep an ERP in step with MasonHub.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, func in (
        ("run", cmd_run),
        ("migrate", cmd_migrate),
        ("check-config", cmd_check_config),
        ("simulate", cmd_simulate),
    ):
        sub = commands.add_parser(name, parents=[common], help=(func.__doc__ or "").strip())
        sub.set_defaults(func=func)
    from syncd.simulator.cli import add_simulate_arguments

    add_simulate_arguments(commands.choices["simulate"])
    _add_events_parser(commands, common)
    demo = commands.add_parser("demo", parents=[common], help=cmd_demo.__doc__)
    demo.add_argument("--orders", type=int, default=200, help="orders to drive (default 200)")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds of activity at most")
    demo.add_argument("--seed", type=int, default=1, help="the simulator's seed")
    demo.set_defaults(func=cmd_demo)
    status = commands.add_parser("status", parents=[common], help=cmd_status.__doc__)
    status.add_argument("--json", action="store_true", help="the report as JSON")
    status.set_defaults(func=cmd_status)
    reconcile = commands.add_parser("reconcile", parents=[common], help=cmd_reconcile.__doc__)
    reconcile.add_argument(
        "--job",
        choices=["orders", "shipments", "inventory", "inbound_shipments", "rmas", "all"],
        default="all",
    )
    reconcile.set_defaults(func=cmd_reconcile)
    subscriptions = commands.add_parser(
        "subscriptions", parents=[common], help=cmd_subscriptions.__doc__
    )
    subscriptions.set_defaults(func=cmd_subscriptions)
    actions = subscriptions.add_subparsers(dest="subscriptions_command", required=True)
    actions.add_parser("list", parents=[common], help="MasonHub's callbacks beside the config's")
    sync = actions.add_parser("sync", parents=[common], help="register and remove to match")
    sync.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``syncd`` console script."""
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.debug = getattr(args, "debug", False)
    func: Command = args.func
    try:
        return func(args)
    except UsageError as exc:
        print(f"syncd: error: {exc.message}", file=sys.stderr)
        return 2
    except SyncdError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"syncd: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"syncd: error: unexpected {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
