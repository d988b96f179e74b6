"""A job's concurrency scopes are read from its limits document: the table that listed
them (written at every enqueue and deleted at every finish of a capped job) goes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_reliable_job_scopes_job", "reliable_job_scopes")
    op.drop_table("reliable_job_scopes")


def downgrade() -> None:
    table = op.create_table(
        "reliable_job_scopes",
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("scope", "job_id"),
    )
    op.create_index("ix_reliable_job_scopes_job", "reliable_job_scopes", ["job_id"])
    # The scopes of every job that may still run, from its limits.
    rows = op.get_bind().execute(
        sa.text(
            "SELECT id, limits FROM reliable_jobs WHERE limits IS NOT NULL"
            " AND status NOT IN ('succeeded', 'failed', 'cancelled')"
        )
    )
    scopes = [
        {"scope": scope, "job_id": row.id}
        for row in rows
        for scope, _ in json.loads(row.limits).get("concurrency", ())
    ]
    if scopes:
        op.bulk_insert(table, scopes)
