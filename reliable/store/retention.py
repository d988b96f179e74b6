"""Retention: finished jobs removed with what refers to them, a batch per transaction.

A batch is the oldest finished jobs past a cut-off, read through the partial index of
finished jobs and locked (``SKIP LOCKED`` on PostgreSQL, so workers purging at once
share the work); then their attempts, steps, event waits, idempotency keys and
debounce rows, then the jobs, each deleted by primary key or an index on the job id.
Unfinished jobs are never read, nor a cancelled job whose attempt still winds down
(it holds a lease and concurrency slots until it returns).

Rate-limit admissions are left to ``prune_rate_events``: an admission counts in its
window whatever became of its job, and deleting it sooner would let a limit admit more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Select,
    TextClause,
    bindparam,
    delete,
    select,
    text,
)

from .database import Database
from .lists import JSONList, one_of, per_dialect
from .schema import (
    FINISHED_SQL,
    IS_FINISHED,
    TERMINAL,
    attempts,
    debounces,
    idempotency_keys,
    jobs,
    steps,
    waits,
)


def _oldest(dialect: str, *, some: bool) -> Select[Any]:
    """Ids of the oldest ``:limit`` finished jobs with ``finished_at < :before`` (of the
    statuses ``:statuses`` when ``some``), locked."""
    conditions = [
        IS_FINISHED,
        jobs.c.finished_at < bindparam("before"),
        jobs.c.lease_owner.is_(None),
    ]
    if some:
        conditions.append(one_of(jobs.c.status, "statuses", dialect))
    return (
        select(jobs.c.id)
        .where(*conditions)
        .order_by(jobs.c.finished_at)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
    )


def _oldest_sqlite(*, some: bool) -> TextClause:
    """``_oldest`` for SQLite, which without table statistics would rather read every
    finished job through the status index and sort them all: the index is named."""
    sql = (
        "SELECT id FROM reliable_jobs INDEXED BY ix_reliable_jobs_finished"
        f" WHERE status IN {FINISHED_SQL} AND finished_at < :before AND lease_owner IS NULL"
    )
    if some:
        sql += " AND status IN (SELECT value FROM json_each(:statuses))"
    statement = text(sql + " ORDER BY finished_at LIMIT :limit")
    return statement.bindparams(bindparam("statuses", type_=JSONList())) if some else statement


_OLDEST: dict[str, dict[bool, Any]] = {
    "sqlite": {some: _oldest_sqlite(some=some) for some in (False, True)},
    "postgresql": {some: _oldest("postgresql", some=some) for some in (False, True)},
}

_DELETE = per_dialect(
    lambda d: (
        [
            delete(table).where(one_of(column, "ids", d))
            for table, column in (
                (attempts, attempts.c.job_id),
                (steps, steps.c.job_id),
                (waits, waits.c.job_id),
                (idempotency_keys, idempotency_keys.c.job_id),
                (debounces, debounces.c.job_id),
            )
        ]
        # By id alone: the rows were read and locked in this transaction (and a status
        # condition would have SQLite read every finished job through the status index).
        + [delete(jobs).where(one_of(jobs.c.id, "ids", d))]
    )
)


class Purging(Database):
    """Removing finished jobs (see ``Store``)."""

    def purge_finished(
        self, before: float, statuses: Sequence[str] = TERMINAL, limit: int = 1000
    ) -> int:
        """Delete up to ``limit`` jobs that finished (with one of ``statuses``) before
        ``before``, oldest first, with their attempts, steps, waits, idempotency keys and
        debounce rows, in one transaction; return how many jobs."""
        some = set(statuses) != set(TERMINAL)
        params: dict[str, Any] = {"before": before, "limit": limit}
        if some:
            params["statuses"] = list(statuses)
        with self._write() as connection:
            ids = connection.execute(_OLDEST[self.dialect][some], params).scalars().all()
            if not ids:
                return 0
            for statement in _DELETE[self.dialect]:
                connection.execute(statement, {"ids": list(ids)})
        return len(ids)
