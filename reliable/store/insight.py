"""What the dashboard reads: bounded counts, recent throughput, queue wait, workers.

Every read here is bounded, so a page costs the same at the millionth job as at the
first: counts stop at ``cap`` (the page says "10,000+"), and what is "recent" is read
from an index, newest first, no further than a fixed number of rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, cast, func, literal_column, select

from .database import Database
from .operator import JobFilter
from .schema import IS_FINISHED, jobs, workers

# Rows read at most for the recent-jobs tables, the throughput plot and the queue wait.
RECENT_ROWS = 10_000
WAIT_SAMPLE = 1_000
STATUSES = ("queued", "running", "sleeping", "succeeded", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker process as it last reported itself."""

    id: str
    hostname: str
    pid: int
    queues: list[str]
    threads: int
    started_at: float
    heartbeat_at: float
    tasks: list[str]


class Insight(Database):
    """Reads for the dashboard (see ``Store``)."""

    def count_by_status_bounded(self, cap: int) -> dict[str, int]:
        """Jobs per status, each count stopping at ``cap + 1`` (on the status index)."""
        found: dict[str, int] = {}
        with self._read() as connection:
            for status in STATUSES:
                # Only columns of the status index: no row is read (a covering scan).
                limited = (
                    select(jobs.c.created_at)
                    .where(jobs.c.status == literal_column(f"'{status}'"))
                    .limit(cap + 1)
                    .subquery()
                )
                count = connection.execute(select(func.count()).select_from(limited)).scalar()
                found[status] = int(count or 0)
        return found

    def count_matching(self, where: JobFilter, cap: int) -> int:
        """How many jobs ``where`` selects, stopping at ``cap + 1``."""
        limited = select(jobs.c.created_at).where(*where.conditions()).limit(cap + 1).subquery()
        with self._read() as connection:
            count = connection.execute(select(func.count()).select_from(limited)).scalar()
        return int(count or 0)

    def recent_by_task(self, rows: int = RECENT_ROWS) -> dict[str, dict[str, int]]:
        """Among the newest ``rows`` jobs: how many of each task are in each status."""
        newest = (
            select(jobs.c.task, jobs.c.status)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .limit(rows)
            .subquery()
        )
        with self._read() as connection:
            counted = connection.execute(
                select(newest.c.task, newest.c.status, func.count()).group_by(
                    newest.c.task, newest.c.status
                )
            ).all()
        found: dict[str, dict[str, int]] = {}
        for task, status, count in counted:
            found.setdefault(task, {})[status] = int(count)
        return found

    def finished_per_bucket(
        self, since: float, width: float, rows: int = RECENT_ROWS
    ) -> list[tuple[int, str, int]]:
        """Jobs finished since ``since``, counted per bucket of ``width`` seconds and per
        status: ``(bucket number from since, status, count)``. Reads the newest ``rows``
        of them at most, on the finished-jobs index."""
        newest = (
            select(jobs.c.finished_at, jobs.c.status)
            .where(IS_FINISHED, jobs.c.finished_at >= since)
            .order_by(jobs.c.finished_at.desc())
            .limit(rows)
            .subquery()
        )
        offset = (newest.c.finished_at - since) / width
        # Truncation towards zero (offsets are never negative); PostgreSQL's CAST rounds.
        bucket = func.floor(offset) if self.dialect == "postgresql" else cast(offset, Integer)
        with self._read() as connection:
            found = connection.execute(
                select(bucket.label("bucket"), newest.c.status, func.count()).group_by(
                    bucket, newest.c.status
                )
            ).all()
        return [(int(row[0]), str(row[1]), int(row[2])) for row in found]

    def recent_waits(self, rows: int = WAIT_SAMPLE) -> list[float]:
        """How long each of the ``rows`` jobs finished last waited from due (``run_at``)
        to started, in seconds."""
        waited = jobs.c.started_at - jobs.c.run_at
        with self._read() as connection:
            found = connection.execute(
                select(waited)
                .where(IS_FINISHED, jobs.c.started_at.is_not(None))
                .order_by(jobs.c.finished_at.desc())
                .limit(rows)
            ).scalars()
            return [max(0.0, float(value)) for value in found]

    def list_workers(self, limit: int = 200) -> list[WorkerRow]:
        """The workers that reported last, newest heartbeat first."""
        with self._read() as connection:
            found = connection.execute(
                select(workers).order_by(workers.c.heartbeat_at.desc()).limit(limit)
            ).all()
        return [
            WorkerRow(
                id=row.id,
                hostname=row.hostname,
                pid=int(row.pid),
                queues=_names(row.queues),
                threads=int(row.threads),
                started_at=float(row.started_at),
                heartbeat_at=float(row.heartbeat_at),
                tasks=_names(row.tasks),
            )
            for row in found
        ]


def _names(document: str | None) -> list[str]:
    if not document:
        return []
    try:
        value: Any = json.loads(document)
    except ValueError:  # queues are stored comma-separated
        return [name for name in document.split(",") if name]
    return [str(name) for name in value] if isinstance(value, list) else [str(value)]
