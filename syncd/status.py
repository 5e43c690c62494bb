"""What needs a person: queue depths, dead letters, poll freshness, the leader — from the store.

The same report serves `syncd status` (exit 1 when something needs a person, for cron and
monitors), ``GET /status`` on the admin listener as JSON, and a small HTML page with the
last 24 hours of deliveries as an inline SVG chart.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta
from typing import Any

from syncd.config import Settings
from syncd.poller import JOBS, LEADER_LEASE, polling_problem
from syncd.store import OutboxState, SqlStore

#: A pending delivery older than this needs a person (the ERP is down, or refusing).
PENDING_ALERT = timedelta(minutes=30)
#: A poll job whose last success is older than this many of its intervals is stale.
STALE_POLL_INTERVALS = 3


def _age(moment: datetime | None, now: datetime) -> float | None:
    return None if moment is None else max(0.0, (now - moment).total_seconds())


def _problems(report: dict[str, Any]) -> list[str]:
    problems = []
    dead = report["outbox"].get(OutboxState.DEAD.value, 0)
    if dead:
        problems.append(f"{dead} dead-lettered deliveries (syncd events list --state dead)")
    failed = report["inbox"].get("failed", 0)
    if failed:
        problems.append(f"{failed} messages failed to normalise (syncd events list --state failed)")
    oldest = report["oldest_pending_seconds"]
    if oldest is not None and oldest > PENDING_ALERT.total_seconds():
        problems.append(f"oldest pending delivery is {_duration(oldest)} old")
    for job, poll in report["polls"].items():
        if poll.get("stale"):
            since = poll.get("last_success_seconds")
            when = "never" if since is None else f"{_duration(since)} ago"
            problems.append(f"poll {job} is stale: last success {when}")
    return problems


def _poll_report(
    settings: Settings, runs: dict[tuple[str, str], dict[str, Any]], now: datetime
) -> dict[str, Any]:
    polling = polling_problem(settings) is None
    polls: dict[str, Any] = {}
    for job in JOBS:
        job_settings = getattr(settings.poll, job)
        last = runs.get((job, "poll"), {})
        reconcile = runs.get((job, "reconcile"), {})
        since = _age(last.get("last_success_at"), now)
        limit = STALE_POLL_INTERVALS * job_settings.every
        polls[job] = {
            "enabled": polling and job_settings.enabled,
            "last_run_at": _iso(last.get("finished_at")),
            "last_run_ok": last.get("ok"),
            "last_error": last.get("error"),
            "last_success_seconds": since,
            "stale": polling and job_settings.enabled and (since is None or since > limit),
            "last_reconcile_at": _iso(reconcile.get("finished_at")),
            "last_reconcile_ok": reconcile.get("ok"),
            "corrections": (reconcile.get("report") or {}).get("corrections", {}),
        }
    return polls


async def collect(
    store: SqlStore, settings: Settings, now: datetime | None = None
) -> dict[str, Any]:
    """The whole status report; ``problems`` lists what needs a person."""
    now = now or datetime.now(UTC)
    holder = await store.lease_holder(LEADER_LEASE)
    report: dict[str, Any] = {
        "time": now.isoformat(),
        "outbox": await store.outbox_counts(),
        "inbox": await store.inbox_counts(),
        "oldest_pending_seconds": _age(await store.oldest_pending(), now),
        "polls": _poll_report(settings, await store.last_runs(), now),
        "leader": None
        if holder is None
        else {"owner": holder[0], "expires_at": holder[1].isoformat(), "live": holder[1] > now},
    }
    report["problems"] = _problems(report)
    return report


def summary(report: dict[str, Any]) -> str:
    """One line, for systemd's STATUS=."""
    outbox = report["outbox"]
    polled = [p["last_success_seconds"] for p in report["polls"].values() if p["enabled"]]
    known = [s for s in polled if s is not None]
    last = f"last poll {_duration(min(known))} ago" if known else "no poll yet"
    return f"pending {outbox.get('pending', 0)}, dead {outbox.get('dead', 0)}, {last}" + (
        f"; {len(report['problems'])} problems" if report["problems"] else ""
    )


def render_text(report: dict[str, Any]) -> str:
    """`syncd status` for a person."""
    outbox, inbox = report["outbox"], report["inbox"]
    oldest = report["oldest_pending_seconds"]
    lines = [
        f"deliveries: {outbox.get('pending', 0)} pending, {outbox.get('dead', 0)} dead"
        + (f", oldest pending {_duration(oldest)}" if oldest is not None else ""),
        f"inbox: {inbox.get('pending', 0)} to merge, {inbox.get('done', 0)} done, "
        f"{inbox.get('failed', 0)} failed",
    ]
    leader = report["leader"]
    lines.append(
        "leader: none"
        if leader is None
        else f"leader: {leader['owner']} (lease {'live' if leader['live'] else 'expired'})"
    )
    lines.append("polls:")
    for job, poll in report["polls"].items():
        if not poll["enabled"]:
            lines.append(f"  {job:18} disabled")
            continue
        since = poll["last_success_seconds"]
        state = "never succeeded" if since is None else f"last success {_duration(since)} ago"
        fixes = sum(poll["corrections"].values())
        lines.append(
            f"  {job:18} {state}; last reconcile {poll['last_reconcile_at'] or 'never'}"
            f" ({fixes} corrections)" + (" STALE" if poll["stale"] else "")
        )
    if report["problems"]:
        lines.append("needs attention:")
        lines.extend(f"  - {p}" for p in report["problems"])
    else:
        lines.append("all well")
    return "\n".join(lines) + "\n"


def render_html(report: dict[str, Any], history: list[tuple[datetime, str]]) -> str:
    """A small self-contained page: the text report and a 24-hour delivery chart."""
    now = datetime.fromisoformat(report["time"])
    chart = delivery_chart(history, now)
    state = "needs attention" if report["problems"] else "all well"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>syncd status</title>"
        "<meta http-equiv='refresh' content='30'>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}pre{background:#f6f6f6;"
        "padding:1em}</style></head><body>"
        f"<h1>syncd: {html.escape(state)}</h1>{chart}"
        f"<pre>{html.escape(render_text(report))}</pre></body></html>"
    )


def delivery_chart(history: list[tuple[datetime, str]], now: datetime) -> str:
    """Inline SVG: ERP calls per hour over the last 24 h, delivered above, failures in red."""
    start = now - timedelta(hours=24)
    ok, failed = [0] * 24, [0] * 24
    for moment, outcome in history:
        slot = int((moment - start).total_seconds() // 3600)
        if 0 <= slot < 24:
            (ok if outcome == "delivered" else failed)[slot] += 1
    top = max([a + b for a, b in zip(ok, failed, strict=True)] + [1])
    bars = []
    for i in range(24):
        h_ok, h_bad = 100 * ok[i] / top, 100 * failed[i] / top
        x = 10 + i * 20
        bars.append(
            f"<rect x='{x}' y='{110 - h_ok:.1f}' width='16' height='{h_ok:.1f}' fill='#2a7'>"
            f"<title>{ok[i]} delivered</title></rect>"
            f"<rect x='{x}' y='{110 - h_ok - h_bad:.1f}' width='16' height='{h_bad:.1f}' "
            f"fill='#c33'><title>{failed[i]} failed</title></rect>"
        )
    return (
        "<svg xmlns='http://www.w3.org/2000/svg' width='500' height='130' role='img' "
        "aria-label='ERP calls per hour, last 24 hours'>"
        + "".join(bars)
        + f"<text x='10' y='125' font-size='10'>24 h ago</text>"
        f"<text x='440' y='125' font-size='10'>now</text>"
        f"<text x='10' y='8' font-size='10'>max {top}/h</text></svg>"
    )


def _iso(moment: Any) -> str | None:
    return moment.isoformat() if isinstance(moment, datetime) else None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
