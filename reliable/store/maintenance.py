"""What workers do now and then to repair and prune: take over the jobs of dead workers,
unpark jobs a race left parked, wake sleeping jobs a race left waiting for nothing, and
delete rate-limit admissions no window counts any more."""

from __future__ import annotations

import json

from sqlalchemy import (
    bindparam,
    select,
    update,
)

from . import rates, slots, steps
from .database import Database
from .schema import (
    IS_CANCELLED,
    IS_RUNNING,
    attempts,
    jobs,
)

_LOST_ERROR = {
    "type": "WorkerLost",
    "message": "the worker stopped renewing its lease (it died or lost the database)",
    "traceback": None,
}


class Maintaining(Database):
    """Periodic repairs (see ``Store``)."""

    def recover_expired(self, now: float, limit: int = 500) -> list[str]:
        """Requeue attempts whose lease expired (their worker died); return their job ids.

        The lost attempt counts against the job's retries and is recorded with a
        ``WorkerLost`` error. A cancelled job whose attempt's worker died gets its
        slots back and stays cancelled.
        """
        with self._write() as connection:
            columns = (
                jobs.c.id,
                jobs.c.status,
                jobs.c.attempts,
                jobs.c.lease_owner,
                jobs.c.started_at,
                jobs.c.limits,
                jobs.c.slots_held,
            )
            rows = [
                *connection.execute(
                    select(*columns)
                    .where(IS_RUNNING, jobs.c.lease_expires_at < now)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                ),
                *connection.execute(
                    select(*columns)
                    .where(
                        IS_CANCELLED,
                        jobs.c.lease_owner.is_not(None),
                        jobs.c.lease_expires_at < now,
                    )
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                ),
            ]
            if not rows:
                return []
            error = json.dumps(_LOST_ERROR)
            lost = [row for row in rows if row.status == "running"]
            if lost:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id == bindparam("b_id"), IS_RUNNING)
                    .values(
                        status="queued",
                        run_at=now,
                        error=error,
                        lease_owner=None,
                        lease_expires_at=None,
                        slots_held=0,
                    ),
                    [{"b_id": row.id} for row in lost],
                )
            ended = [row for row in rows if row.status != "running"]
            if ended:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([row.id for row in ended]))
                    .values(lease_owner=None, lease_expires_at=None, slots_held=0)
                )
            slots.release_slots(connection, [row.limits for row in rows if row.slots_held])
            connection.execute(
                attempts.insert(),
                [
                    {
                        "job_id": row.id,
                        "attempt": row.attempts,
                        "worker_id": row.lease_owner,
                        "outcome": "lost",
                        "started_at": row.started_at,
                        "finished_at": now,
                        "error": error,
                    }
                    for row in rows
                ],
            )
            self._notify_other_processes(connection)
        self._wake()
        return [row.id for row in lost]

    def sweep_parked(self) -> int:
        """Unpark jobs of concurrency scopes that have free slots; see ``flow``."""
        with self._write() as connection:
            return slots.sweep_parked(connection)

    def prune_rate_events(self, now: float) -> int:
        """Delete rate-limit admissions that no window counts any more; see ``flow``."""
        with self._write() as connection:
            return rates.prune_rate_events(connection, now)

    def wake_orphaned_sleepers(self, now: float) -> int:
        """Repair lost wake-ups: sleeping jobs that wait for nothing are due now."""
        with self._write() as connection:
            woken = steps.wake_orphaned_sleepers(connection, now)
            if woken:
                self._notify_other_processes(connection)
        if woken:
            self._wake()
        return woken
