"""Outbox entries are appended per accepted change; one delivery lease per source.

A newer change of a document no longer rewrites its entry in place: it is appended (its id
orders delivery) and the older entry is deleted. Instead of a lease written on every entry it
claims, a delivery holds its source's lease (delivery_lease) and claims entries by id after
the last it claimed. Acknowledging a batch then deletes its entries and writes nothing else.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LATEST_ENTRIES = """
UPDATE doc_state SET entry_id = (
    SELECT id FROM outbox_entry
    WHERE outbox_entry.source = doc_state.source AND outbox_entry.doc_id = doc_state.doc_id
)
"""


_ISSUED = "SELECT seq FROM sqlite_sequence WHERE name = 'outbox_entry'"
_FORGET_COUNT = "DELETE FROM sqlite_sequence WHERE name = 'outbox_entry'"
_GO_ON_FROM = """
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox_entry', MAX(:issued, COALESCE(MAX(id), 0)) FROM outbox_entry
"""


def _utc() -> sa.DateTime:
    # service.tables.UTCDateTime stores through this type; migrations do not import the models.
    return sa.DateTime(timezone=True)


@contextmanager
def _outbox_copied() -> Iterator[BatchOperations]:
    """`op.batch_alter_table` for outbox_entry, which copies the table on SQLite: keeping
    AUTOINCREMENT, and going on counting ids from the highest ever issued (the copy would
    count from the highest one it holds), so no entry id is ever issued twice."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    issued = op.get_bind().execute(sa.text(_ISSUED)).scalar() if sqlite else None
    with op.batch_alter_table("outbox_entry", table_kwargs={"sqlite_autoincrement": True}) as batch:
        yield batch
    if issued is not None:
        op.execute(_FORGET_COUNT)
        op.execute(sa.text(_GO_ON_FROM).bindparams(issued=issued))


def upgrade() -> None:
    """Create delivery_lease, point each document's state at its entry, and drop per-entry
    leases and the one-entry-per-document constraint.

    Leases taken before the upgrade are dropped: a change whose request was cut off then may
    be sent once more (harmless: the same row).
    """
    op.create_table(
        "delivery_lease",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("lease_id", sa.Integer(), nullable=False),
        sa.Column("until", _utc(), nullable=True),
        sa.Column("claimed_to", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_delivery_lease")),
    )
    op.add_column("doc_state", sa.Column("entry_id", sa.Integer(), nullable=True))
    op.execute(_LATEST_ENTRIES)
    op.drop_index("ix_outbox_entry_source_due", table_name="outbox_entry")
    with _outbox_copied() as batch:
        batch.drop_constraint("uq_outbox_entry_source_doc_id", type_="unique")
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_version")
    op.create_index("ix_outbox_entry_source_id", "outbox_entry", ["source", "id"])


def downgrade() -> None:
    """Back to one entry per document with a lease of its own."""
    op.drop_index("ix_outbox_entry_source_id", table_name="outbox_entry")
    with _outbox_copied() as batch:
        batch.add_column(sa.Column("claimed_until", _utc(), nullable=True))
        batch.add_column(sa.Column("claimed_version", sa.Integer(), nullable=True))
        batch.create_unique_constraint("uq_outbox_entry_source_doc_id", ["source", "doc_id"])
    op.create_index(
        "ix_outbox_entry_source_due", "outbox_entry", ["source", "next_attempt_at", "id"]
    )
    with op.batch_alter_table("doc_state") as batch:
        batch.drop_column("entry_id")
    op.drop_table("delivery_lease")
