"""Snapshot sources: one content hash per id a snapshot gave, and each source's last snapshot.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    # service.tables.UTCDateTime stores through this type; migrations do not import the models.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create snapshot_seen and snapshot_state."""
    op.create_table(
        "snapshot_seen",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("doc_id", sa.Text(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=True),
        sa.Column("seen", sa.Integer(), nullable=False),
        sa.Column("staged_digest", sa.Text(), nullable=True),
        sa.Column("staged_row", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("source", "doc_id", name=op.f("pk_snapshot_seen")),
    )
    op.create_table(
        "snapshot_state",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("phase", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("counts", sa.Text(), nullable=True),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.CheckConstraint(
            "phase IN ('reading', 'applying', 'held', 'done', 'failed')",
            name=op.f("ck_snapshot_state_phase"),
        ),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_snapshot_state")),
    )


def downgrade() -> None:
    """Drop snapshot_state and snapshot_seen."""
    op.drop_table("snapshot_state")
    op.drop_table("snapshot_seen")
