"""What callers and operators read: a job, its attempts, counts, flow-control state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    func,
    select,
)

from . import flow_state
from .database import Database
from .records import (
    AttemptRow,
    JobRow,
)
from .schema import (
    IS_DUE,
    attempts,
    jobs,
)


class Querying(Database):
    """Reads of jobs for callers and operators (see ``Store``)."""

    def get_job(self, job_id: str) -> JobRow | None:
        with self._read() as connection:
            row = connection.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else JobRow(**row._asdict())

    def get_status(self, job_id: str) -> str | None:
        with self._read() as connection:
            status: str | None = connection.execute(
                select(jobs.c.status).where(jobs.c.id == job_id)
            ).scalar()
        return status

    def get_attempts(self, job_id: str) -> list[AttemptRow]:
        with self._read() as connection:
            rows = connection.execute(
                select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.attempt)
            ).all()
        return [AttemptRow(**row._asdict()) for row in rows]

    def has_due(self, queues: Sequence[str], now: float) -> bool:
        """Whether any job of ``queues`` is due; a cheap read before taking the write lock."""
        with self._read() as connection:
            found = connection.execute(
                select(jobs.c.id)
                .where(
                    IS_DUE,
                    jobs.c.queue.in_(queues),
                    jobs.c.run_at <= now,
                )
                .limit(1)
            ).first()
        return found is not None

    def count_by_status(self) -> dict[str, int]:
        with self._read() as connection:
            rows = connection.execute(
                select(jobs.c.status, func.count()).group_by(jobs.c.status)
            ).all()
        return {row[0]: int(row[1]) for row in rows}

    def flow_state(self, now: float) -> dict[str, list[dict[str, Any]]]:
        with self._read() as connection:
            return flow_state.state(connection, now)
