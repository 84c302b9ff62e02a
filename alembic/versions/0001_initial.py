"""Create checkpoint, outbox_entry and dead_letter.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    # service.tables.UTCDateTime stores through this type; migrations do not import the models.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create checkpoint, outbox_entry and dead_letter."""
    op.create_table(
        "checkpoint",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("seq", sa.Text(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_checkpoint")),
    )
    op.create_table(
        "outbox_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("doc_id", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("op", sa.Text(), nullable=False),
        sa.Column("row", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("answers", sa.Text(), nullable=False),
        sa.Column("next_attempt_at", _utc(), nullable=False),
        sa.Column("claimed_until", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint("op IN ('upsert', 'delete')", name=op.f("ck_outbox_entry_op")),
        sa.CheckConstraint(
            """(op = 'upsert') = ("row" IS NOT NULL)""",
            name=op.f("ck_outbox_entry_row_matches_op"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_entry")),
        sa.UniqueConstraint("source", "doc_id", name=op.f("uq_outbox_entry_source_doc_id")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outbox_entry_due", "outbox_entry", ["next_attempt_at", "id"])
    op.create_table(
        "dead_letter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("doc_id", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=False),
        sa.Column("op", sa.Text(), nullable=False),
        sa.Column("row", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("answers", sa.Text(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter")),
    )
    op.create_index("ix_dead_letter_source_doc_id", "dead_letter", ["source", "doc_id"])


def downgrade() -> None:
    """Drop the three tables (and with them every checkpoint, outbox entry and dead letter)."""
    op.drop_index("ix_dead_letter_source_doc_id", table_name="dead_letter")
    op.drop_table("dead_letter")
    op.drop_index("ix_outbox_entry_due", table_name="outbox_entry")
    op.drop_table("outbox_entry")
    op.drop_table("checkpoint")
