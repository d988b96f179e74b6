"""Leases: renewed by a worker's heartbeat, checked for cancels and takeovers, given
back at shutdown."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    bindparam,
    case,
    func,
    select,
    update,
)

from . import slots
from .database import Database
from .lists import one_of
from .records import (
    AttemptStates,
)
from .schema import (
    HOLDS_LEASE,
    IS_CANCELLED,
    jobs,
    workers,
)


class Leasing(Database):
    """Leases of running attempts, and the workers that hold them (see ``Store``)."""

    def heartbeat(
        self,
        worker_id: str,
        held: Sequence[tuple[str, int]],
        now: Callable[[], float],
        lease_seconds: float,
        *,
        hostname: str,
        pid: int,
        queues: Sequence[str],
        threads: int,
        started_at: float,
        tasks: Sequence[str] = (),
    ) -> AttemptStates:
        """Renew the leases ``worker_id`` holds for ``held`` (job id, attempt); record the
        worker alive. Returns which of them were cancelled meanwhile, and which lost
        their lease (their jobs were taken over).

        ``now`` is read once the transaction has its locks: a renewal that waited for
        the database extends the lease from when it is written."""
        with self._write() as connection:
            at = now()
            renewed: Sequence[Any] = ()
            if held:
                renewed = connection.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_([job_id for job_id, _ in held]),
                        jobs.c.lease_owner == worker_id,
                        HOLDS_LEASE,
                    )
                    .values(lease_expires_at=at + lease_seconds)
                    .returning(jobs.c.id, jobs.c.attempts, jobs.c.status)
                ).all()
            stmt = self._insert(workers).values(
                id=worker_id,
                hostname=hostname,
                pid=pid,
                queues=",".join(queues),
                threads=threads,
                started_at=started_at,
                heartbeat_at=at,
                tasks=json.dumps(sorted(tasks)),
            )
            connection.execute(
                stmt.on_conflict_do_update(
                    index_elements=[workers.c.id],
                    set_={"heartbeat_at": stmt.excluded.heartbeat_at, "tasks": stmt.excluded.tasks},
                )
            )
        return AttemptStates.of(held, renewed)

    def check_attempts(self, worker_id: str, held: Sequence[tuple[str, int]]) -> AttemptStates:
        """Which of the attempts ``held`` (job id, attempt) by ``worker_id`` were
        cancelled, and which lost their lease; a read, cheap enough to run often."""
        if not held:
            return AttemptStates()
        with self._read() as connection:
            rows = connection.execute(
                select(jobs.c.id, jobs.c.attempts, jobs.c.status).where(
                    one_of(jobs.c.id, "ids", self.dialect),
                    jobs.c.lease_owner == bindparam("worker"),
                    HOLDS_LEASE,
                ),
                {"ids": [job_id for job_id, _ in held], "worker": worker_id},
            ).all()
        return AttemptStates.of(held, rows)

    def remove_worker(self, worker_id: str) -> None:
        with self._write() as connection:
            connection.execute(workers.delete().where(workers.c.id == worker_id))

    def release(self, worker_id: str, held: Sequence[tuple[str, int]], now: float) -> int:
        """Give back attempts that never ran to completion (graceful shutdown).

        The attempt is not counted: the job is queued again, due at once, for any worker
        (a job cancelled meanwhile stays cancelled, and only its slots come back).
        """
        if not held:
            return 0
        with self._write() as connection:
            attempts_of = dict(held)
            rows = [
                row
                for row in connection.execute(
                    select(
                        jobs.c.id, jobs.c.status, jobs.c.attempts, jobs.c.limits, jobs.c.slots_held
                    )
                    .where(jobs.c.id.in_(attempts_of), jobs.c.lease_owner == worker_id, HOLDS_LEASE)
                    .with_for_update()
                )
                if attempts_of[row.id] == row.attempts
            ]
            if rows:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([row.id for row in rows]))
                    .values(
                        status=case((IS_CANCELLED, jobs.c.status), else_="queued"),
                        attempts=jobs.c.attempts - 1,
                        run_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        slots_held=0,
                    )
                )
                slots.release_slots(connection, [row.limits for row in rows if row.slots_held])
            released = sum(1 for row in rows if row.status == "running")
            self._notify_other_processes(connection)
        self._wake()
        return int(released)

    def live_workers(self, now: float, within: float) -> int:
        """How many workers have renewed their heartbeat in the last ``within`` seconds
        before ``now``: the workers alive anywhere, as far as the database knows."""
        with self._read() as connection:
            count = connection.execute(
                select(func.count())
                .select_from(workers)
                .where(workers.c.heartbeat_at >= now - within)
            ).scalar_one()
        return int(count)
