"""`syncd events`: what was received, what it did, and replaying deliveries."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import TextIO

from syncd.errors import SyncdError
from syncd.store import EntityRecord, SqlStore


class EventNotFound(SyncdError):
    """No such event."""


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


async def list_events(
    store: SqlStore,
    state: str | None,
    message_type: str | None,
    since: datetime | None,
    limit: int,
    out: TextIO = sys.stdout,
) -> int:
    """Print received messages, newest first, one per line."""
    rows = await store.list_events(state=state, message_type=message_type, since=since, limit=limit)
    out.write(f"{'ID':>8}  {'RECEIVED (UTC)':19}  {'TYPE':22}  {'STATE':7}  FACTS  MESSAGE ID\n")
    for e in rows:
        line = (
            f"{e.id:>8}  {_time(e.received_at):19}  {e.message_type[:22]:22}  {e.state:7}  "
            f"{e.facts:>5}  {e.message_id or '-'}"
        )
        out.write(line + (f"  ({e.error})" if e.error else "") + "\n")
    return 0


async def show_event(store: SqlStore, event_id: int, out: TextIO = sys.stdout) -> int:
    """Print one message: its raw body, the facts it stated, and each entity's deliveries."""
    message = await store.get_message(event_id)
    if message is None:
        raise EventNotFound(f"no event with ID {event_id}")
    out.write(
        f"event {message.id}  {message.message_type}  message_id={message.message_id or '-'}\n"
        f"received {_time(message.received_at)} UTC from {message.remote_addr or '-'} "
        f"via {message.source}; state {message.state.value}"
        + (f" ({message.error})" if message.error else "")
        + "\n\nbody:\n"
    )
    try:
        out.write(json.dumps(json.loads(message.body), indent=2, ensure_ascii=False) + "\n")
    except ValueError:
        out.write(message.body.decode("utf-8", errors="replace") + "\n")
    facts = await store.facts_of(event_id)
    out.write(f"\nfacts ({len(facts)}):\n")
    for fact in facts:
        reason = f" ({fact.reason})" if fact.reason else ""
        out.write(f"  {fact.entity_type} {fact.entity_key}: {fact.outcome}{reason}\n")
    for key in dict.fromkeys((f.entity_type, f.entity_key) for f in facts):
        entity = await store.get_entity(*key)
        if entity is not None:
            await _write_entity(store, entity, out)
    return 0


async def _write_entity(store: SqlStore, entity: EntityRecord, out: TextIO) -> None:
    if entity.outbox_state is None:
        delivery = "delivered" if entity.delivered_hash == entity.content_hash else "not queued"
    else:
        delivery = f"{entity.outbox_state.value}, {entity.attempts} failed attempts"
        if entity.last_error:
            delivery += f", last error: {entity.last_error}"
    out.write(
        f"\n{entity.entity_type} {entity.entity_key}: revision {entity.revision}, {delivery}\n"
    )
    for attempt in await store.attempts_of(entity.id):
        status = attempt.status_code if attempt.status_code is not None else "-"
        error = f"  {attempt.error}" if attempt.error else ""
        replay = " replay" if attempt.replay else ""
        out.write(
            f"  {_time(attempt.finished_at)}  {attempt.outcome:9}  {status}  "
            f"{attempt.idempotency_key}{replay}{error}\n"
        )


async def replay(
    store: SqlStore,
    event_id: int | None,
    dead: bool,
    since: datetime | None,
    out: TextIO = sys.stdout,
) -> int:
    """Queue entities again: an event's entities, or every dead-lettered one."""
    if event_id is not None:
        if await store.get_message(event_id) is None:
            raise EventNotFound(f"no event with ID {event_id}")
        entity_ids = await store.entity_ids_of_event(event_id)
    else:
        entity_ids = []
    if dead:
        entity_ids += await store.dead_entity_ids(since)
    queued = await store.requeue(entity_ids)
    out.write(f"queued {queued} of {len(set(entity_ids))} entities for replay\n")
    return 0
