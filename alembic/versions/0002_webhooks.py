"""Add doc_state and seen_webhook, and the source's version on outbox entries and dead letters.

doc_state starts from what the store holds: each document's highest version among its outbox
entry and dead letters, so versions keep growing across the upgrade.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KNOWN_DOCUMENTS = """
INSERT INTO doc_state (source, doc_id, version, source_version, updated_at)
SELECT source, doc_id, MAX(version), NULL, MAX(at)
FROM (
    SELECT source, doc_id, version, updated_at AS at FROM outbox_entry
    UNION ALL
    SELECT source, doc_id, version, created_at AS at FROM dead_letter
) AS known
GROUP BY source, doc_id
"""


def _utc() -> sa.DateTime:
    # service.tables.UTCDateTime stores through this type; migrations do not import the models.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create doc_state (filled from the outbox and dead letters) and seen_webhook."""
    op.create_table(
        "doc_state",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("doc_id", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source_version", sa.Text(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("source", "doc_id", name=op.f("pk_doc_state")),
    )
    op.create_table(
        "seen_webhook",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("webhook_id", sa.Text(), nullable=False),
        sa.Column("seen_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("source", "webhook_id", name=op.f("pk_seen_webhook")),
    )
    op.create_index("ix_seen_webhook_source_seen_at", "seen_webhook", ["source", "seen_at"])
    # A nullable column: a plain ALTER TABLE ... ADD COLUMN on both databases.
    op.add_column("outbox_entry", sa.Column("source_version", sa.Text(), nullable=True))
    op.add_column("dead_letter", sa.Column("source_version", sa.Text(), nullable=True))
    op.execute(_KNOWN_DOCUMENTS)


def downgrade() -> None:
    """Drop the source versions, seen_webhook and doc_state (local versions start over)."""
    # SQLite cannot drop a column in place everywhere: batch mode copies the table, keeping
    # AUTOINCREMENT so outbox entry ids are still never reused.
    with op.batch_alter_table("dead_letter") as batch:
        batch.drop_column("source_version")
    with op.batch_alter_table("outbox_entry", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("source_version")
    op.drop_index("ix_seen_webhook_source_seen_at", table_name="seen_webhook")
    op.drop_table("seen_webhook")
    op.drop_table("doc_state")
