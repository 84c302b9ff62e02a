"""Document states remember what PANDA acknowledged last, so an unchanged row is not sent.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add doc_state.delivered (NULL: not known what PANDA holds, so the next change is sent)."""
    op.add_column("doc_state", sa.Column("delivered", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop doc_state.delivered."""
    with op.batch_alter_table("doc_state") as batch:
        batch.drop_column("delivered")
