"""Delivery leases name their holder, so that a restarted process takes over at once a lease
its crashed predecessor held on the same machine.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add delivery_lease.holder (NULL: taken before the upgrade, by nobody known)."""
    op.add_column("delivery_lease", sa.Column("holder", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop delivery_lease.holder."""
    with op.batch_alter_table("delivery_lease") as batch:
        batch.drop_column("holder")
