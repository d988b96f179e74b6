"""A cancelled job keeps the lease of its running attempt until that attempt ends: an
index finds those whose worker died, so their slots come back when the lease expires.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

WHERE = "status = 'cancelled' AND lease_owner IS NOT NULL"


def upgrade() -> None:
    op.create_index(
        "ix_reliable_jobs_winding_down",
        "reliable_jobs",
        ["lease_expires_at"],
        sqlite_where=sa.text(WHERE),
        postgresql_where=sa.text(WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_reliable_jobs_winding_down", "reliable_jobs")
