"""Cheaper slot bookkeeping: a job's scopes found by job id, and a flag on each
concurrency scope telling whether jobs were parked on it.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_reliable_job_scopes_job", "reliable_job_scopes", ["job_id"])
    with op.batch_alter_table("reliable_concurrency") as table:
        table.add_column(
            sa.Column("parked", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    # Scopes with parked jobs now: their next release must look for them.
    op.execute(
        "UPDATE reliable_concurrency SET parked = 1 WHERE scope IN"
        " (SELECT blocked_on FROM reliable_jobs WHERE blocked_on IS NOT NULL)"
    )


def downgrade() -> None:
    with op.batch_alter_table("reliable_concurrency") as table:
        table.drop_column("parked")
    op.drop_index("ix_reliable_job_scopes_job", "reliable_job_scopes")
