"""An application for tests that run real worker processes.

Workers load it with ``reliable worker tests.apps.worker_app:rel``; the database comes
from ``RELIABLE_DATABASE_URL``. Each task leaves a row in ``side_effects`` (keyed by the
job id, written at most once), so a test can tell which jobs really ran, and where. The
table is created when the module is imported, so that no attempt pays for it.

Run as a module (``python -m tests.apps.worker_app``) it is a producer instead: it
prints ``ready`` once the database is open, then enqueues ``record(0)`` with each
idempotency key read from stdin and prints the job it got as a JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, text
from sqlalchemy.dialects import postgresql, sqlite

from reliable import Reliable, current_job

# How long ``slow`` sleeps in this process: a test starts one worker with a long sleep
# and its successor with a short one, since both run the same attempt of the same job.
SLOW_SECONDS_ENV = "WORKER_APP_SLOW_SECONDS"
# A folder where each attempt leaves ``<job id>.started`` when it begins, if set.
MARKERS_ENV = "WORKER_APP_MARKERS"
# Serialises creating the table across processes on PostgreSQL (an arbitrary lock id).
_DDL_LOCK = 0x73696465

rel = Reliable()

metadata = MetaData()
side_effects = Table(
    "side_effects",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("n", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
)


def _engine() -> Engine:
    # The store's engine: the same database, already set up for concurrent writers.
    return rel.store.engine


def create_side_effects_table() -> None:
    """Create ``side_effects`` unless it exists; processes starting together may race."""
    with _engine().begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _DDL_LOCK})
        metadata.create_all(connection, checkfirst=True)


def mark_started() -> None:
    """Tell a watching test that this attempt has begun (see ``WORKER_APP_MARKERS``)."""
    folder = os.environ.get(MARKERS_ENV)
    if folder:
        Path(folder, f"{current_job().id}.started").touch()


def record_side_effect(n: int) -> None:
    """Insert this job's row; a second run of the same job (after a crash) adds nothing."""
    engine = _engine()
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(side_effects)
        .values(job_id=current_job().id, n=n, pid=os.getpid())
        .on_conflict_do_nothing(index_elements=[side_effects.c.job_id])
    )
    with engine.begin() as connection:
        connection.execute(statement)


@rel.task
def record(n: int, seconds: float = 0.0) -> int:
    """Work for ``seconds``, then leave the side effect; returns ``n``."""
    mark_started()
    time.sleep(seconds)
    record_side_effect(n)
    return n


@rel.task
def gated(n: int, gate: str) -> int:
    """Wait until the file ``gate`` exists (at most 30 s), then leave the side effect."""
    mark_started()
    deadline = time.monotonic() + 30
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    record_side_effect(n)
    return n


@rel.task
def slow(n: int) -> int:
    """Work for ``WORKER_APP_SLOW_SECONDS`` (default 60), then leave the side effect."""
    mark_started()
    time.sleep(float(os.environ.get(SLOW_SECONDS_ENV, "60")))
    record_side_effect(n)
    return n


def produce() -> None:
    """Enqueue ``record(0)`` once per idempotency key read from stdin; report each job."""
    print("ready", flush=True)
    for line in sys.stdin:
        key = line.strip()
        handle = record.enqueue(0, idempotency_key=key)
        print(json.dumps({"key": key, "id": handle.id, "created": handle.created}), flush=True)
    rel.close()


create_side_effects_table()

if __name__ == "__main__":
    produce()
