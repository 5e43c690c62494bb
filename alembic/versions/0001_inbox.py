"""Inbox of received messages and quarantine of unparseable bodies.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from syncd.store import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("dedupe_key", sa.String(255), nullable=False),
        sa.Column("message_type", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("processed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_inbox"),
        sa.UniqueConstraint("dedupe_key", name="uq_inbox_dedupe_key"),
    )
    op.create_index("ix_inbox_state_id", "inbox", ["state", "id"])
    op.create_index("ix_inbox_received_at", "inbox", ["received_at"])
    op.create_table(
        "quarantine",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("message_type", sa.String(64), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=False),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_quarantine"),
    )
    op.create_index("ix_quarantine_received_at", "quarantine", ["received_at"])


def downgrade() -> None:
    op.drop_table("quarantine")
    op.drop_table("inbox")
