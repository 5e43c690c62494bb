"""`syncd events list|show|replay` against a real store, run as a user runs them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from syncd.store import NewMessage, SqlStore
from syncd.testing import dumps, envelope
from tests.test_cli import syncd, write_config


async def seed(db: Path) -> None:
    """Three messages: one delivered, one dead-lettered with a 400, one that failed to parse."""
    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    await store.migrate()
    now = datetime.now(UTC)
    bodies = {
        "ok-1": envelope(
            "orderEvent", [{"customer_identifier": "A-1", "status": "packed"}], "ok-1"
        ),
        "dead-1": envelope(
            "orderEvent",
            [
                {
                    "customer_identifier": "B-1",
                    "status": "fulfilled",
                    "shipments": [{"shipment_id": "s", "tracking_number": "1ZB"}],
                }
            ],
            "dead-1",
        ),
        "bad-1": envelope("orderEvent", [{"status": "packed"}], "bad-1"),
    }
    await store.add_messages(
        [
            NewMessage(key, "orderEvent", key, "webhook", dumps(body), now)
            for key, body in bodies.items()
        ]
    )
    await store.process_inbox()
    for claim in await store.claim_deliveries("seed", 10, 60):
        if claim.entity_key == "A-1":
            await store.complete_delivery(claim, "seed", started_at=now, status=200)
        else:
            await store.fail_delivery(
                claim,
                "seed",
                started_at=now,
                status=400,
                error="ERP answered 400: no such order",
                retry_at=None,
                permanent=True,
            )
    await store.close()


@pytest.fixture
async def config(tmp_path: Path) -> Path:
    """A config whose store holds the seeded messages."""
    await seed(tmp_path / "e.db")
    return write_config(tmp_path / "c.toml", tmp_path / "e.db")


def test_list_shows_states(config: Path) -> None:
    """events list shows each message with its state, newest first; --state filters."""
    result = syncd("events", "list", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "RECEIVED"]
    by_id = {line.split()[-1]: line for line in lines[1:] if "(" not in line}
    assert " done " in by_id["ok-1"]
    assert " dead " in by_id["dead-1"]
    failed = [line for line in lines if "bad-1" in line]
    assert " failed " in failed[0]
    assert "customer_identifier" in failed[0]
    dead = syncd("events", "list", "--state", "dead", "--config", str(config))
    assert [line.split()[-1] for line in dead.stdout.splitlines()[1:]] == ["dead-1"]
    recent = syncd("events", "list", "--since", "1h", "--config", str(config))
    assert len(recent.stdout.splitlines()) == 4


def test_show_has_body_facts_and_attempts(config: Path) -> None:
    """events show prints the raw message, its facts and the delivery attempts with errors."""
    result = syncd("events", "show", "2", "--config", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "message_id=dead-1" in out
    assert json.loads(out.split("body:\n", 1)[1].split("\n\nfacts", 1)[0])["message_id"] == "dead-1"
    assert "order B-1: applied" in out
    assert "dead, 1 failed attempts" in out
    assert "permanent  400  order:B-1:r1  ERP answered 400: no such order" in out


def test_show_unknown_event(config: Path) -> None:
    """events show of an unknown ID exits 1 with one line."""
    result = syncd("events", "show", "999", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == "syncd: error: no event with ID 999"


def test_replay_dead_and_by_id(config: Path) -> None:
    """replay --dead re-queues dead entities; replay ID re-queues a delivered one."""
    dead = syncd("events", "replay", "--dead", "--config", str(config))
    assert dead.returncode == 0, dead.stderr
    assert dead.stdout.strip() == "queued 1 of 1 entities for replay"
    again = syncd("events", "replay", "--dead", "--config", str(config))
    assert again.stdout.strip() == "queued 0 of 0 entities for replay"
    delivered = syncd("events", "replay", "1", "--config", str(config))
    assert delivered.stdout.strip() == "queued 1 of 1 entities for replay"
    listing = syncd("events", "list", "--state", "dead", "--config", str(config))
    assert len(listing.stdout.splitlines()) == 1


def test_replay_needs_a_target(config: Path) -> None:
    """replay with neither an ID nor --dead is bad usage: exit 2."""
    result = syncd("events", "replay", "--config", str(config))
    assert result.returncode == 2
    assert "give an event ID or --dead" in result.stderr


def test_bad_since(config: Path) -> None:
    """An unreadable --since is bad usage with the value named."""
    result = syncd("events", "list", "--since", "last tuesday", "--config", str(config))
    assert result.returncode == 2
    assert "last tuesday" in result.stderr
