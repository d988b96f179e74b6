"""The tables, as SQLAlchemy Core metadata; the same schema on SQLite and PostgreSQL.

Times are UTC epoch seconds in ``DOUBLE`` columns whose names end in ``_at``. JSON
documents (payloads, results, errors) are text written by ``reliable.serialization``.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    ColumnElement,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    literal_column,
    text,
)

metadata = MetaData()

# Statuses a worker may pick up once ``run_at`` has come.
CLAIMABLE = ("queued", "sleeping")

jobs = Table(
    "reliable_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("task", String(200), nullable=False),
    Column("queue", String(100), nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    # queued | running | sleeping | succeeded | failed | cancelled
    Column("status", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("result", Text),
    Column("error", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("run_at", Double, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", Double),
    Column("idempotency_key", String(255)),
    # The claim path: an index lookup over due jobs only, highest priority first.
    Index(
        "ix_reliable_jobs_due",
        "queue",
        text("priority DESC"),
        "run_at",
        sqlite_where=text("status IN ('queued', 'sleeping')"),
        postgresql_where=text("status IN ('queued', 'sleeping')"),
    ),
    # Finding attempts whose worker died.
    Index(
        "ix_reliable_jobs_leases",
        "lease_expires_at",
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
    Index(
        "ix_reliable_jobs_lease_owner",
        "lease_owner",
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
    Index("ix_reliable_jobs_task_created", "task", "created_at"),
    Index("ix_reliable_jobs_status_created", "status", "created_at"),
)

# One row per attempt that did not succeed (the successful one is the job row itself).
attempts = Table(
    "reliable_attempts",
    metadata,
    Column("job_id", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker_id", String(64)),
    Column("outcome", String(16), nullable=False),  # retry | failed | timeout | lost
    Column("started_at", Double),
    Column("finished_at", Double, nullable=False),
    Column("error", Text),
    PrimaryKeyConstraint("job_id", "attempt"),
)

# Idempotency keys: uniqueness lives here, in the primary key.
idempotency_keys = Table(
    "reliable_idempotency_keys",
    metadata,
    Column("scope", String(300), nullable=False),
    Column("key", String(255), nullable=False),
    Column("job_id", String(32), nullable=False),
    Column("fingerprint", String(64)),
    Column("expires_at", Double, nullable=False),
    PrimaryKeyConstraint("scope", "key"),
    Index("ix_reliable_idempotency_keys_expires", "expires_at"),
)

workers = Table(
    "reliable_workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Text, nullable=False),
    Column("threads", Integer, nullable=False),
    Column("started_at", Double, nullable=False),
    Column("heartbeat_at", Double, nullable=False),
)

# Conditions written with literal values, not bound parameters, so that SQLite and
# PostgreSQL (also with prepared, generic plans) can prove they match the partial indexes.
IS_CLAIMABLE: ColumnElement[bool] = jobs.c.status.in_(
    [literal_column(f"'{status}'") for status in CLAIMABLE]
)
IS_RUNNING: ColumnElement[bool] = jobs.c.status == literal_column("'running'")
