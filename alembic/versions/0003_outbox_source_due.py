"""Index outbox entries by source and due time, for delivery's per-dataset claims.

Without it, claiming the due entries of one source either sorts that source's whole backlog
or scans the other sources' entries on every claim.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ix_outbox_entry_source_due."""
    op.create_index(
        "ix_outbox_entry_source_due", "outbox_entry", ["source", "next_attempt_at", "id"]
    )


def downgrade() -> None:
    """Drop ix_outbox_entry_source_due."""
    op.drop_index("ix_outbox_entry_source_due", table_name="outbox_entry")
