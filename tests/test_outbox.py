"""Store contract for entity state and the outbox, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from syncd.facts import Fact, Version, inventory_fact, order_fact
from syncd.store import ClaimedDelivery, OutboxState, SqlStore
from tests.conftest import _truncate

T = TypeVar("T")


def shipped(key: str, *tracking: str) -> Fact:
    return order_fact(
        {
            "customer_identifier": key,
            "status": "fulfilled",
            "shipments": [{"shipment_id": t, "tracking_number": t} for t in tracking],
        },
        "webhook",
    )


def stock(sku: str, available: int, minute: int) -> Fact:
    return inventory_fact(
        {
            "customer_identifier": sku,
            "total_available_to_sell": available,
            "total_units": available,
            "as_of": f"2026-12-03T10:{minute:02d}:00Z",
        },
        "webhook",
    )


async def test_new_fact_creates_entity_and_pending_delivery(store: SqlStore) -> None:
    """A first fact stores the entity at revision 1 and queues one delivery."""
    result = await store.apply_facts([shipped("O-1", "1Z1")])
    assert result.queued == 1
    entity = await store.get_entity("order", "O-1")
    assert entity is not None
    assert (entity.revision, entity.outbox_state, entity.delivered_hash) == (
        1,
        OutboxState.PENDING,
        None,
    )


async def test_entity_state_json_round_trips_values_orjson_refuses(store: SqlStore) -> None:
    """Entity state comes back from the store as it went in, non-ASCII text included, and so do
    values orjson cannot encode (a 70-bit integer, a lone surrogate): those take the standard
    library's path instead of failing the merge."""
    state = {
        "customer_identifier": "O-json",
        "status": "fulfilled",
        "ship_to": {"name": "Zoë Ångström 東京"},
        "big": 2**70,
        "odd": "\ud800",
    }
    await store.apply_facts([Fact("order", "O-json", state, Version(None, None), "webhook")])
    [claim] = await store.claim_deliveries("w", 1, 30)
    assert claim.state == state


async def test_changes_coalesce_into_one_pending_row(store: SqlStore) -> None:
    """Five changes before delivery leave one pending row that carries the latest state."""
    for minute in range(5):
        await store.apply_facts([stock("SKU-1", 100 - minute, minute)])
    [claim] = await store.claim_deliveries("w1", 10, 30)
    assert claim.state["total_available_to_sell"] == 96
    assert claim.revision == 5
    assert await store.claim_deliveries("w2", 10, 30) == []


async def test_stale_and_identical_facts_are_recorded_not_queued(store: SqlStore) -> None:
    """An older as_of is stale, the same counts again are unchanged; neither queues work."""
    await store.apply_facts([stock("SKU-2", 10, 30)])
    [claim] = await store.claim_deliveries("w", 1, 30)
    await store.complete_delivery(claim, "w", started_at=datetime.now(UTC), status=200)
    older = await store.apply_facts([stock("SKU-2", 7, 10)])
    same = await store.apply_facts([stock("SKU-2", 10, 40)])
    assert [d.outcome.value for d in older.decisions] == ["stale"]
    assert [d.outcome.value for d in same.decisions] == ["unchanged"]
    assert older.queued == same.queued == 0
    assert await store.outbox_counts() == {}


async def test_change_during_delivery_is_sent_after_it(store: SqlStore) -> None:
    """State that changes while a call is in flight is queued again once the call completes."""
    await store.apply_facts([stock("SKU-3", 5, 1)])
    [first] = await store.claim_deliveries("w", 1, 30)
    await store.apply_facts([stock("SKU-3", 4, 2)])
    assert await store.claim_deliveries("w", 1, 30) == []  # one entity, one call at a time
    await store.complete_delivery(first, "w", started_at=datetime.now(UTC), status=200)
    [second] = await store.claim_deliveries("w", 1, 30)
    assert (second.revision, second.state["total_available_to_sell"]) == (2, 4)
    await store.complete_delivery(second, "w", started_at=datetime.now(UTC), status=200)
    assert await store.outbox_counts() == {}


async def test_expired_lease_is_claimed_again_with_the_same_key(store: SqlStore) -> None:
    """A lease left by a dead worker expires; the next claim gets the same Idempotency-Key."""
    await store.apply_facts([shipped("O-2", "1Z2")])
    [first] = await store.claim_deliveries("dead-worker", 1, 0.2)
    assert await store.claim_deliveries("other", 1, 30) == []
    await asyncio.sleep(0.3)
    [again] = await store.claim_deliveries("other", 1, 30)
    assert again.idempotency_key == first.idempotency_key == "order:O-2:r1"
    # The dead worker's late answer does not touch the row the new owner holds.
    await store.complete_delivery(first, "dead-worker", started_at=datetime.now(UTC), status=200)
    assert (await store.outbox_counts()) == {"pending": 1}


async def test_failure_schedules_retry_then_dead_letter(store: SqlStore) -> None:
    """A transient failure waits until its retry time; a dead-lettered row is never claimed."""
    await store.apply_facts([shipped("O-3", "1Z3")])
    [claim] = await store.claim_deliveries("w", 1, 30)
    retry_at = datetime.now(UTC) + timedelta(seconds=60)
    await store.fail_delivery(
        claim,
        "w",
        started_at=datetime.now(UTC),
        status=503,
        error="down",
        retry_at=retry_at,
        permanent=False,
    )
    assert await store.claim_deliveries("w", 1, 30) == []
    due = await store.next_due_at()
    assert due is not None
    assert abs((due - retry_at).total_seconds()) < 0.01
    entity = await store.get_entity("order", "O-3")
    assert entity is not None
    assert (entity.attempts, entity.last_status, entity.last_error) == (1, 503, "down")
    await store.fail_delivery(
        claim,
        "w",
        started_at=datetime.now(UTC),
        status=400,
        error="bad",
        retry_at=None,
        permanent=True,
    )
    # The lease was already released by the first failure: the second write changes nothing.
    assert (await store.outbox_counts()) == {"pending": 1}


async def test_dead_letter_and_replay(store: SqlStore) -> None:
    """A dead row stays until replayed; the replay gets a new Idempotency-Key."""
    await store.apply_facts([shipped("O-4", "1Z4")])
    [claim] = await store.claim_deliveries("w", 1, 30)
    await store.fail_delivery(
        claim,
        "w",
        started_at=datetime.now(UTC),
        status=400,
        error="no",
        retry_at=None,
        permanent=True,
    )
    assert await store.outbox_counts() == {"dead": 1}
    assert await store.claim_deliveries("w", 1, 30) == []
    dead = await store.dead_entity_ids()
    assert await store.requeue(dead) == 1
    [replayed] = await store.claim_deliveries("w", 1, 30)
    assert replayed.idempotency_key == "order:O-4:r1:replay1"
    attempts = await store.attempts_of(claim.entity_id)
    assert [(a.outcome, a.status_code) for a in attempts] == [("permanent", 400)]


async def test_new_state_revives_a_dead_letter(store: SqlStore) -> None:
    """A newer state for a dead-lettered entity gets a fresh set of attempts."""
    await store.apply_facts([shipped("O-5", "1Z5")])
    [claim] = await store.claim_deliveries("w", 1, 30)
    await store.fail_delivery(
        claim,
        "w",
        started_at=datetime.now(UTC),
        status=422,
        error="no",
        retry_at=None,
        permanent=True,
    )
    result = await store.apply_facts([shipped("O-5", "1Z5", "1Z6")])
    assert result.queued == 1
    [again] = await store.claim_deliveries("w", 1, 30)
    assert (again.revision, again.attempts) == (2, 0)
    assert [s["tracking_number"] for s in again.state["shipments"]] == ["1Z5", "1Z6"]


async def test_release_leases_on_stop(store: SqlStore) -> None:
    """Leases given back at a clean stop make the rows claimable at once."""
    await store.apply_facts([shipped("O-6", "1Z6")])
    await store.claim_deliveries("stopping", 1, 600)
    assert await store.release_leases("stopping") == 1
    assert len(await store.claim_deliveries("next", 1, 30)) == 1


async def test_released_lease_of_a_call_cut_short_waits_until_due(store: SqlStore) -> None:
    """A lease given back with ``due_at`` (its call was cancelled, the ERP may still apply it)
    is not claimable before then."""
    await store.apply_facts([shipped("O-7", "1Z7")])
    await store.claim_deliveries("stopping", 1, 600)
    due = datetime.now(UTC) + timedelta(seconds=0.5)
    assert await store.release_leases("stopping", due_at=due) == 1
    assert await store.claim_deliveries("next", 1, 30) == []
    await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) + 0.05)
    assert len(await store.claim_deliveries("next", 1, 30)) == 1


async def test_claims_never_overlap(store: SqlStore) -> None:
    """Concurrent claimers never lease the same row twice."""
    await store.apply_facts([shipped(f"C-{n}", "1Z") for n in range(40)])
    batches = await asyncio.gather(*(store.claim_deliveries(f"w{i}", 7, 30) for i in range(8)))
    ids = [c.outbox_id for batch in batches for c in batch]
    assert len(ids) == len(set(ids)) == 40


async def test_version_older_than() -> None:
    """Rank decides first; at one rank a timestamp decides; unknowns never make a fact stale."""
    t1, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    assert Version(30, t2).older_than(Version(40, t1)) == "older lifecycle status"
    assert Version(40, t1).older_than(Version(40, t2)) == "older timestamp"
    assert Version(40, None).older_than(Version(40, t2)) is None
    assert Version(None, None).older_than(Version(40, t2)) is None
    assert Version(50, t1).older_than(Version(40, t2)) is None


async def test_unforeseen_record_fails_its_message_only(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A normaliser that crashes marks only its message failed; the others merge."""
    from syncd import facts
    from syncd.store import NewMessage
    from syncd.testing import dumps, envelope

    def broken(item: object, source: str) -> Fact:
        raise KeyError("surprise")

    monkeypatch.setitem(facts.ITEM_NORMALISERS, "rmaEvent", broken)
    now = datetime.now(UTC)
    rma = dumps(envelope("rmaEvent", [{"customer_identifier": "R"}], "w"))
    good = dumps(envelope("orderEvent", [{"customer_identifier": "G", "status": "packed"}], "g"))
    await store.add_messages(
        [
            NewMessage("w", "rmaEvent", "w", "webhook", rma, now),
            NewMessage("g", "orderEvent", "g", "webhook", good, now),
        ]
    )
    result = await store.process_inbox()
    assert (result.messages, result.failed, result.queued) == (2, 1, 1)
    [failed] = await store.list_events(state="failed")
    assert failed.message_id == "w"
    assert "cannot normalise: KeyError" in (failed.error or "")


async def test_completions_recorded_together(store: SqlStore) -> None:
    """Several completions in one transaction: unchanged rows finish, a changed one is re-queued,
    and one whose lease moved to another worker is left alone."""
    from syncd.store import Completion

    await store.apply_facts([stock(f"B-{n}", 10, 1) for n in range(3)])
    claims = await store.claim_deliveries("w", 3, 30)
    await store.apply_facts([stock("B-1", 9, 2)])
    now = datetime.now(UTC)
    done = [Completion(c, "w", now, 200) for c in claims]
    done[2] = Completion(claims[2], "someone-else", now, 200)
    # Only the changed row, B-1, is due again; the one held elsewhere is that worker's.
    assert [c.entity_key for c in claims] == ["B-0", "B-1", "B-2"]
    assert await store.complete_deliveries(done) == [False, True, False]
    [again] = await store.claim_deliveries("w", 5, 30)
    assert (again.entity_key, again.revision) == ("B-1", 2)
    assert await store.outbox_counts() == {"pending": 2}
    attempts = [a for c in claims for a in await store.attempts_of(c.entity_id)]
    assert [a.outcome for a in attempts] == ["delivered"] * 3


async def test_permanent_failure_of_an_old_version_does_not_dead_letter_a_newer_one(
    store: SqlStore,
) -> None:
    """A 400 for the version in flight must not bury the state that arrived meanwhile: the
    newer state gets its own attempts."""
    await store.apply_facts([stock("SKU-4", 5, 1)])
    [first] = await store.claim_deliveries("w", 1, 30)
    await store.apply_facts([stock("SKU-4", 4, 2)])
    await store.fail_delivery(
        first,
        "w",
        started_at=datetime.now(UTC),
        status=400,
        error="bad request",
        retry_at=None,
        permanent=True,
    )
    entity = await store.get_entity("inventory", "SKU-4")
    assert entity is not None
    assert entity.outbox_state is OutboxState.PENDING
    [second] = await store.claim_deliveries("w", 1, 30)
    assert (second.revision, second.state["total_available_to_sell"]) == (2, 4)


async def behind_a_completion(
    url: str, claim: ClaimedDelivery, blocked: Coroutine[Any, Any, T]
) -> T:
    """Run ``blocked`` while a second connection is part way through a completion of
    ``claim``: the completion holds the entity's lock (as complete_deliveries does first),
    ``blocked`` must wait for it, and the completion then deletes the outbox row and
    commits. ``blocked``'s result once it could go on."""
    dsn = make_url(url).set(drivername="postgresql")
    completion = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        tx = completion.transaction()
        await tx.start()
        await completion.execute(
            "UPDATE entities SET delivered_revision = 1 WHERE id = $1", claim.entity_id
        )
        task = asyncio.create_task(blocked)
        await asyncio.sleep(0.5)
        assert not task.done(), "it should wait for the entity's lock"
        await completion.execute("DELETE FROM outbox WHERE id = $1", claim.outbox_id)
        await tx.commit()
        return await task
    finally:
        await completion.close()


@pytest.mark.postgres
async def test_merge_blocked_behind_a_completion_still_queues_its_change(
    pg_migrated_url: str,
) -> None:
    """PostgreSQL, READ COMMITTED: a merge that waits for the entity lock of a completion
    which then deletes the outbox row must queue a new row, not trust the row it first saw
    (found by the store-outage reliability scenario: a `delivered` never reached the ERP)."""
    store = SqlStore(pg_migrated_url)
    try:
        await store.apply_facts([stock("SKU-race", 5, 1)])
        [claim] = await store.claim_deliveries("w", 1, 30)
        await behind_a_completion(
            pg_migrated_url, claim, store.apply_facts([stock("SKU-race", 4, 2)])
        )
        entity = await store.get_entity("inventory", "SKU-race")
        assert entity is not None
        assert (entity.revision, entity.outbox_state) == (2, OutboxState.PENDING)
        [second] = await store.claim_deliveries("w", 1, 30)
        assert second.state["total_available_to_sell"] == 4
    finally:
        await store.close()
        await _truncate(pg_migrated_url)  # the run's database is shared by later tests


@pytest.mark.postgres
async def test_replay_blocked_behind_a_completion_queues_the_replay(pg_migrated_url: str) -> None:
    """PostgreSQL: a replay that waits for the entity lock of a completion, which then
    deletes the outbox row, must queue the replay, not answer "already on its way"."""
    store = SqlStore(pg_migrated_url)
    try:
        await store.apply_facts([stock("SKU-replay", 5, 1)])
        [claim] = await store.claim_deliveries("w", 1, 30)
        assert (
            await behind_a_completion(pg_migrated_url, claim, store.requeue([claim.entity_id])) == 1
        )
        [again] = await store.claim_deliveries("w", 1, 30)
        assert again.replay == 1
    finally:
        await store.close()
        await _truncate(pg_migrated_url)
