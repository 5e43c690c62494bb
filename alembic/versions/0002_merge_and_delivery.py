"""Entity state, recorded facts, the outbox and the log of ERP calls.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from syncd.store import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "entities",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("entity_type", sa.String(32), nullable=False),
        sa.Column("entity_key", sa.String(255), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("version_rank", sa.Integer(), nullable=True),
        sa.Column("version_ts", UTCDateTime(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("replays", sa.Integer(), nullable=False),
        sa.Column("delivered_hash", sa.String(64), nullable=True),
        sa.Column("delivered_revision", sa.Integer(), nullable=True),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_entities"),
        sa.UniqueConstraint("entity_type", "entity_key", name="uq_entities_entity_type_entity_key"),
    )
    op.create_table(
        "facts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("inbox_id", sa.BigInteger(), nullable=True),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("version_rank", sa.Integer(), nullable=True),
        sa.Column("version_ts", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_facts"),
        sa.ForeignKeyConstraint(
            ["inbox_id"], ["inbox.id"], name="fk_facts_inbox_id_inbox", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["entity_id"], ["entities.id"], name="fk_facts_entity_id_entities"),
    )
    op.create_index("ix_facts_inbox_id", "facts", ["inbox_id"])
    op.create_index("ix_facts_entity_id", "facts", ["entity_id"])
    op.create_table(
        "outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("replay", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("entity_id", name="uq_outbox_entity_id"),
        sa.ForeignKeyConstraint(
            ["entity_id"], ["entities.id"], name="fk_outbox_entity_id_entities"
        ),
    )
    op.create_index("ix_outbox_state_next_attempt_at", "outbox", ["state", "next_attempt_at"])
    op.create_table(
        "delivery_attempts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(400), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("replay", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_delivery_attempts"),
        sa.ForeignKeyConstraint(
            ["entity_id"], ["entities.id"], name="fk_delivery_attempts_entity_id_entities"
        ),
    )
    op.create_index("ix_delivery_attempts_entity_id", "delivery_attempts", ["entity_id"])
    op.create_index("ix_delivery_attempts_finished_at", "delivery_attempts", ["finished_at"])


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    op.drop_table("outbox")
    op.drop_table("facts")
    op.drop_table("entities")
