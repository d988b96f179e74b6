"""On SQLite, the index of finished jobs keyed on ``finished_at IS NOT NULL`` instead of
the status: SQLite rewrote the status-partial one at every settle, at half the drain
rate. PostgreSQL keeps the index as it was.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

FINISHED_SQL = "status IN ('succeeded', 'failed', 'cancelled')"


def _replace(where: str) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.drop_index("ix_reliable_jobs_finished", "reliable_jobs")
    op.create_index(
        "ix_reliable_jobs_finished", "reliable_jobs", ["finished_at"], sqlite_where=sa.text(where)
    )


def upgrade() -> None:
    _replace("finished_at IS NOT NULL")


def downgrade() -> None:
    _replace(FINISHED_SQL)
