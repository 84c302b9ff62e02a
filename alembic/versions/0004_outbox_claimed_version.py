"""Remember which version of an outbox entry a lease was taken for; drop the global due index.

A delivery then settles its whole batch with one DELETE that keeps every entry a newer
change replaced meanwhile (`version <> claimed_version`), instead of reading each entry's
version back first. Delivery claims per source (ix_outbox_entry_source_due), so
ix_outbox_entry_due only cost every enqueue and acknowledgement an index update.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add outbox_entry.claimed_version (NULL: no lease taken since the column existed).

    A lease taken before the upgrade has no claimed version: its acknowledgement removes
    nothing and releases the entry, which is then delivered once more (harmless: same row).
    """
    op.add_column("outbox_entry", sa.Column("claimed_version", sa.Integer(), nullable=True))
    op.drop_index("ix_outbox_entry_due", table_name="outbox_entry")


def downgrade() -> None:
    """Drop outbox_entry.claimed_version; restore ix_outbox_entry_due."""
    op.create_index("ix_outbox_entry_due", "outbox_entry", ["next_attempt_at", "id"])
    with op.batch_alter_table("outbox_entry") as batch:
        batch.drop_column("claimed_version")
