"""Debouncing at enqueue: calls of one scope within the window fold into its pending job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Connection,
    select,
    update,
)

from .records import DebounceCheck, NewJob
from .schema import (
    debounces,
    jobs,
)


def collapse(
    connection: Connection, insert: Any, job: NewJob, check: DebounceCheck, now: float
) -> str | None:
    """Fold ``job`` into the pending job of its debounce scope; return that job's id.

    Returns ``None`` when there is no pending job: the caller inserts ``job``, which
    becomes the scope's pending job, due ``window`` from now.
    """
    stmt = insert(debounces).values(scope=check.scope, job_id=job.id, first_at=now)
    connection.execute(
        stmt.on_conflict_do_update(
            index_elements=[debounces.c.scope], set_={"scope": stmt.excluded.scope}
        )
    )  # exists now, and locked until commit
    row = connection.execute(
        select(debounces.c.job_id, debounces.c.first_at).where(debounces.c.scope == check.scope)
    ).one()
    if row.job_id != job.id:
        due = now + check.window
        if check.max_wait is not None:
            due = min(due, float(row.first_at) + check.max_wait)
        updated = connection.execute(
            update(jobs)
            .where(jobs.c.id == row.job_id, jobs.c.status == "queued", jobs.c.attempts == 0)
            .values(payload=job.payload, run_at=due)
        ).rowcount
        if updated:
            return str(row.job_id)
        connection.execute(
            update(debounces)
            .where(debounces.c.scope == check.scope)
            .values(job_id=job.id, first_at=now)
        )
    return None
