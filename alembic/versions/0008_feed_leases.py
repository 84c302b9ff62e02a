"""Feed leases and replicas: each source's feed is followed by one replica at a time.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    # service.tables.UTCDateTime stores through this type; migrations do not import the models.
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add feed_lease, replica and checkpoint.token."""
    op.create_table(
        "feed_lease",
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=True),
        sa.Column("taken_at", _utc(), nullable=True),
        sa.Column("until", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("source", name=op.f("pk_feed_lease")),
    )
    op.create_table(
        "replica",
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("until", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("holder", name=op.f("pk_replica")),
    )
    op.add_column("checkpoint", sa.Column("token", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("checkpoint") as batch:
        batch.drop_column("token")
    op.drop_table("replica")
    op.drop_table("feed_lease")
