"""Time: deadlines on jobs (``start_within``, ``finish_within``), cron schedules, and
the indexes retention deletes through (finished jobs oldest first; idempotency keys and
debounce rows by job).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"

# Indexes ordered by priority, highest first. On SQLite, a table that batch mode copies
# (an added column with a server default makes it copy) gets its indexes back from
# reflection, which loses DESC: the claim then sorts the due jobs instead of reading
# them in order. They are rebuilt here if that happened.
DESCENDING: dict[str, tuple[list[str | sa.TextClause], str]] = {
    "ix_reliable_jobs_due": (
        ["queue", sa.text("priority DESC"), "run_at"],
        "status IN ('queued', 'sleeping') AND blocked_on IS NULL",
    ),
    "ix_reliable_jobs_blocked": (
        ["blocked_on", sa.text("priority DESC"), "run_at"],
        "blocked_on IS NOT NULL",
    ),
}


def restore_descending_indexes() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    for name, (columns, where) in DESCENDING.items():
        sql = bind.execute(
            sa.text("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"),
            {"name": name},
        ).scalar()
        if sql is not None and "DESC" in sql:
            continue
        if sql is not None:
            op.drop_index(name, "reliable_jobs")
        op.create_index(name, "reliable_jobs", columns, sqlite_where=sa.text(where))


def upgrade() -> None:
    # Nullable columns without a default: SQLite adds them in place, no table copy.
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.add_column(sa.Column("start_by", sa.Double))
        batch.add_column(sa.Column("finish_by", sa.Double))
    restore_descending_indexes()
    op.create_index(
        "ix_reliable_jobs_finished",
        "reliable_jobs",
        ["finished_at"],
        sqlite_where=sa.text(FINISHED),
        postgresql_where=sa.text(FINISHED),
    )
    op.create_index("ix_reliable_idempotency_keys_job", "reliable_idempotency_keys", ["job_id"])
    op.create_index("ix_reliable_debounces_job", "reliable_debounces", ["job_id"])
    op.create_table(
        "reliable_schedules",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("last_tick_at", sa.Double, nullable=False),
        sa.Column("next_tick_at", sa.Double, nullable=False),
        sa.Column("last_run_at", sa.Double),
        sa.Column("last_job_id", sa.String(32)),
        sa.Column("created_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reliable_schedules")
    op.drop_index("ix_reliable_debounces_job", "reliable_debounces")
    op.drop_index("ix_reliable_idempotency_keys_job", "reliable_idempotency_keys")
    op.drop_index("ix_reliable_jobs_finished", "reliable_jobs")
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.drop_column("finish_by")
        batch.drop_column("start_by")
