"""Flow control: concurrency slots, parked jobs, rate-limit windows, throttles, debounces.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DUE = sa.text("status IN ('queued', 'sleeping') AND blocked_on IS NULL")
OLD_DUE = sa.text("status IN ('queued', 'sleeping')")
BLOCKED = sa.text("blocked_on IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.add_column(sa.Column("limits", sa.Text))
        batch.add_column(sa.Column("blocked_on", sa.String(300)))
        batch.add_column(
            sa.Column("slots_held", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
    op.drop_index("ix_reliable_jobs_due", table_name="reliable_jobs")
    op.create_index(
        "ix_reliable_jobs_due",
        "reliable_jobs",
        ["queue", sa.text("priority DESC"), "run_at"],
        sqlite_where=DUE,
        postgresql_where=DUE,
    )
    op.create_index(
        "ix_reliable_jobs_blocked",
        "reliable_jobs",
        ["blocked_on", sa.text("priority DESC"), "run_at"],
        sqlite_where=BLOCKED,
        postgresql_where=BLOCKED,
    )
    op.create_table(
        "reliable_job_scopes",
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("scope", "job_id"),
    )
    op.create_table(
        "reliable_concurrency",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("in_use", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("capacity", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "reliable_rate_limits",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("limit", sa.Integer, nullable=False),
        sa.Column("period_seconds", sa.Double, nullable=False),
    )
    op.create_table(
        "reliable_rate_events",
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("admitted_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("scope", "job_id"),
    )
    op.create_index(
        "ix_reliable_rate_events_window", "reliable_rate_events", ["scope", "admitted_at"]
    )
    op.create_table(
        "reliable_throttles",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("next_at", sa.Double, nullable=False),
    )
    op.create_table(
        "reliable_debounces",
        sa.Column("scope", sa.String(300), primary_key=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("first_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "reliable_debounces",
        "reliable_throttles",
        "reliable_rate_events",
        "reliable_rate_limits",
        "reliable_concurrency",
        "reliable_job_scopes",
    ):
        op.drop_table(table)
    op.drop_index("ix_reliable_jobs_blocked", table_name="reliable_jobs")
    op.drop_index("ix_reliable_jobs_due", table_name="reliable_jobs")
    op.create_index(
        "ix_reliable_jobs_due",
        "reliable_jobs",
        ["queue", sa.text("priority DESC"), "run_at"],
        sqlite_where=OLD_DUE,
        postgresql_where=OLD_DUE,
    )
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.drop_column("slots_held")
        batch.drop_column("blocked_on")
        batch.drop_column("limits")
