"""Jobs, attempts, idempotency keys and workers.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CLAIMABLE = sa.text("status IN ('queued', 'sleeping')")
RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        "reliable_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("run_at", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_expires_at", sa.Double),
        sa.Column("idempotency_key", sa.String(255)),
    )
    op.create_index(
        "ix_reliable_jobs_due",
        "reliable_jobs",
        ["queue", sa.text("priority DESC"), "run_at"],
        sqlite_where=CLAIMABLE,
        postgresql_where=CLAIMABLE,
    )
    op.create_index(
        "ix_reliable_jobs_leases",
        "reliable_jobs",
        ["lease_expires_at"],
        sqlite_where=RUNNING,
        postgresql_where=RUNNING,
    )
    op.create_index(
        "ix_reliable_jobs_lease_owner",
        "reliable_jobs",
        ["lease_owner"],
        sqlite_where=RUNNING,
        postgresql_where=RUNNING,
    )
    op.create_index("ix_reliable_jobs_task_created", "reliable_jobs", ["task", "created_at"])
    op.create_index("ix_reliable_jobs_status_created", "reliable_jobs", ["status", "created_at"])

    op.create_table(
        "reliable_attempts",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker_id", sa.String(64)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double, nullable=False),
        sa.Column("error", sa.Text),
        sa.PrimaryKeyConstraint("job_id", "attempt"),
    )
    op.create_table(
        "reliable_idempotency_keys",
        sa.Column("scope", sa.String(300), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("scope", "key"),
    )
    op.create_index(
        "ix_reliable_idempotency_keys_expires", "reliable_idempotency_keys", ["expires_at"]
    )
    op.create_table(
        "reliable_workers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("threads", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Idle workers LISTEN on this channel, so a new job starts within milliseconds.
        op.execute(
            """
            CREATE FUNCTION reliable_notify_jobs() RETURNS trigger AS $$
            BEGIN
                PERFORM pg_notify('reliable_jobs', '');
                RETURN NULL;
            END
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            """
            CREATE TRIGGER reliable_jobs_notify AFTER INSERT ON reliable_jobs
            FOR EACH STATEMENT EXECUTE FUNCTION reliable_notify_jobs()
            """
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS reliable_jobs_notify ON reliable_jobs")
        op.execute("DROP FUNCTION IF EXISTS reliable_notify_jobs()")
    op.drop_table("reliable_workers")
    op.drop_table("reliable_idempotency_keys")
    op.drop_table("reliable_attempts")
    op.drop_table("reliable_jobs")
