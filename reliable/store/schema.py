"""The tables, as SQLAlchemy Core metadata; the same schema on SQLite and PostgreSQL.

Times are UTC epoch seconds in ``DOUBLE`` columns whose names end in ``_at`` (a time
something happened or is due) or ``_by`` (a deadline). JSON
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
# Statuses a job ends in.
TERMINAL = ("succeeded", "failed", "cancelled")
FINISHED_SQL = "('succeeded', 'failed', 'cancelled')"

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
    # JSON: {"concurrency": [scope, ...], "throttle": scope, "keys": {option: value}}
    Column("limits", Text),
    # A concurrency scope that was full when this job's turn came: it waits off the
    # claim path until a slot of that scope is released.
    Column("blocked_on", String(300)),
    Column("slots_held", Integer, nullable=False, server_default=text("0")),
    # Attempts made before the last manual retry: they do not count against ``retries``.
    Column("attempt_base", Integer, nullable=False, server_default=text("0")),
    # The job this one replays (``Reliable.replay``).
    Column("replay_of", String(32)),
    # An event that cancels the job (``cancel_on=``), and what its data must match (JSON).
    Column("cancel_on", String(200)),
    Column("cancel_match", Text),
    # Deadlines: to start by (``start_within``; cleared once the job has run), and to
    # finish by (``finish_within``), retries and sleeps included.
    Column("start_by", Double),
    Column("finish_by", Double),
    # The enqueuing span's trace context (W3C ``traceparent``), when tracing is on.
    Column("trace_context", Text),
    # The claim path: an index lookup over due jobs only, highest priority first.
    Index(
        "ix_reliable_jobs_due",
        "queue",
        text("priority DESC"),
        "run_at",
        sqlite_where=text("status IN ('queued', 'sleeping') AND blocked_on IS NULL"),
        postgresql_where=text("status IN ('queued', 'sleeping') AND blocked_on IS NULL"),
    ),
    Index(
        "ix_reliable_jobs_blocked",
        "blocked_on",
        text("priority DESC"),
        "run_at",
        sqlite_where=text("blocked_on IS NOT NULL"),
        postgresql_where=text("blocked_on IS NOT NULL"),
    ),
    # Finding attempts whose worker died.
    Index(
        "ix_reliable_jobs_leases",
        "lease_expires_at",
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
    # Cancelled jobs whose attempt still winds down, holding a lease and its slots:
    # given back when the attempt ends, or when its worker died and the lease expired.
    Index(
        "ix_reliable_jobs_winding_down",
        "lease_expires_at",
        sqlite_where=text("status = 'cancelled' AND lease_owner IS NOT NULL"),
        postgresql_where=text("status = 'cancelled' AND lease_owner IS NOT NULL"),
    ),
    Index(
        "ix_reliable_jobs_lease_owner",
        "lease_owner",
        sqlite_where=text("status = 'running'"),
        postgresql_where=text("status = 'running'"),
    ),
    Index("ix_reliable_jobs_task_created", "task", "created_at"),
    Index("ix_reliable_jobs_status_created", "status", "created_at"),
    # Retention and throughput: finished jobs by when they finished. On SQLite keyed on
    # finished_at alone (only a finished job has one): a partial index on the status
    # halved its drain rate, each settle rewriting it (bench.revisions).
    Index(
        "ix_reliable_jobs_finished",
        "finished_at",
        sqlite_where=text("finished_at IS NOT NULL"),
        postgresql_where=text(f"status IN {FINISHED_SQL}"),
    ),
    # Listings, newest first, a page after another (``Reliable.jobs``).
    Index("ix_reliable_jobs_created", "created_at", "id"),
    Index(
        "ix_reliable_jobs_cancel_on",
        "cancel_on",
        sqlite_where=text("cancel_on IS NOT NULL"),
        postgresql_where=text("cancel_on IS NOT NULL"),
    ),
)

# Tasks and queues an operator paused: workers claim none of their jobs meanwhile.
pauses = Table(
    "reliable_pauses",
    metadata,
    Column("kind", String(8), nullable=False),  # task | queue
    Column("name", String(200), nullable=False),
    Column("paused_at", Double, nullable=False),
    PrimaryKeyConstraint("kind", "name"),
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
    # Retention deletes the keys of the jobs it removes.
    Index("ix_reliable_idempotency_keys_job", "job_id"),
)

# Slots in use per concurrency scope ("task#cap#key"); capacities live in the code.
concurrency = Table(
    "reliable_concurrency",
    metadata,
    Column("scope", String(300), primary_key=True),
    Column("in_use", Integer, nullable=False, server_default=text("0")),
    Column("capacity", Integer, nullable=False, server_default=text("0")),
    # Set when jobs are parked on the scope, so that a release looks for them only then;
    # cleared by the periodic sweep once none is left.
    Column("parked", Integer, nullable=False, server_default=text("0")),
)

# One row per rate-limited scope, locked while admitting, and its admissions.
rate_limits = Table(
    "reliable_rate_limits",
    metadata,
    Column("scope", String(300), primary_key=True),
    Column("limit", Integer, nullable=False),
    Column("period_seconds", Double, nullable=False),
)
rate_events = Table(
    "reliable_rate_events",
    metadata,
    Column("scope", String(300), nullable=False),
    Column("job_id", String(32), nullable=False),
    Column("admitted_at", Double, nullable=False),
    PrimaryKeyConstraint("scope", "job_id"),
    Index("ix_reliable_rate_events_window", "scope", "admitted_at"),
)

# The earliest time the next job of a throttled scope may start.
throttles = Table(
    "reliable_throttles",
    metadata,
    Column("scope", String(300), primary_key=True),
    Column("next_at", Double, nullable=False),
)

# The pending job that calls of a debounced scope collapse into.
debounces = Table(
    "reliable_debounces",
    metadata,
    Column("scope", String(300), primary_key=True),
    Column("job_id", String(32), nullable=False),
    Column("first_at", Double, nullable=False),
    Index("ix_reliable_debounces_job", "job_id"),
)

# Completed (and failed) steps of durable jobs: a completed step is never run again.
steps = Table(
    "reliable_steps",
    metadata,
    Column("job_id", String(32), nullable=False),
    Column("name", String(200), nullable=False),
    Column("position", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # succeeded | failed
    Column("attempts", Integer, nullable=False, server_default=text("1")),
    Column("result", Text),
    Column("error", Text),
    Column("started_at", Double, nullable=False),
    Column("finished_at", Double),
    PrimaryKeyConstraint("job_id", "name"),
)

# Jobs parked until an event (or their timeout).
waits = Table(
    "reliable_waits",
    metadata,
    Column("job_id", String(32), nullable=False),
    Column("step", String(200), nullable=False),
    Column("event", String(200), nullable=False),
    Column("match", Text),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double),
    PrimaryKeyConstraint("job_id", "step"),
    Index("ix_reliable_waits_event", "event"),
)

events = Table(
    "reliable_events",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("data", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Index("ix_reliable_events_name_created", "name", "created_at"),
)

# Cron schedules (``@rel.cron``): one row each, shared by every process. The job of a
# tick is unique by its idempotency key (scope ``schedule:<name>``, the tick's time).
schedules = Table(
    "reliable_schedules",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("cron", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    # Ticks up to this time are dealt with (enqueued, or skipped as too late); for a
    # schedule that has not ticked yet, when it was first seen.
    Column("last_tick_at", Double, nullable=False),
    Column("next_tick_at", Double, nullable=False),
    # The tick of the newest job enqueued, and that job.
    Column("last_run_at", Double),
    Column("last_job_id", String(32)),
    Column("created_at", Double, nullable=False),
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
    # The tasks it runs (JSON list), so listings can tell jobs no live worker knows.
    Column("tasks", Text),
)

# Conditions written with literal values, not bound parameters, so that SQLite and
# PostgreSQL (also with prepared, generic plans) can prove they match the partial indexes.
IS_CLAIMABLE: ColumnElement[bool] = jobs.c.status.in_(
    [literal_column(f"'{status}'") for status in CLAIMABLE]
)
IS_RUNNING: ColumnElement[bool] = jobs.c.status == literal_column("'running'")
IS_DUE: ColumnElement[bool] = IS_CLAIMABLE & jobs.c.blocked_on.is_(None)
# A job whose attempt holds a lease: running, or cancelled while that attempt winds
# down (it keeps its lease and its slots until its function has returned).
HOLDS_LEASE: ColumnElement[bool] = jobs.c.status.in_(
    [literal_column("'running'"), literal_column("'cancelled'")]
)
# A job cancelled while its attempt ran stays cancelled whatever the attempt's outcome:
# settling it only gives back the lease and the slots.
IS_CANCELLED: ColumnElement[bool] = jobs.c.status == literal_column("'cancelled'")
IS_FINISHED: ColumnElement[bool] = jobs.c.status.in_(
    [literal_column(f"'{status}'") for status in TERMINAL]
)
