"""What operators do to jobs: list them a page at a time, cancel, retry, replay (one or
every job matching a filter), pause and resume tasks and queues; and events, which may
cancel jobs too (``cancel_on``).

Listings are newest first, by keyset (``created_at``, ``id``) on an index, so a page
costs the same at the millionth job as at the first. Bulk actions walk the same keyset
in batches, one transaction per batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, func, or_, select, tuple_, update

from ..errors import ConfigError
from . import steps
from .database import Database
from .records import JobRow
from .schema import TERMINAL, jobs, pauses, workers
from .schema import steps as step_rows

# Rows changed per transaction by a bulk action.
BATCH = 500
PAUSE_KINDS = ("task", "queue")


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a listing or a bulk action is about; every field narrows it.

    ``key`` matches a job's idempotency key or any of its limit key values; ``error``
    is text within its last error; ``since`` and ``until`` bound ``created_at``.
    """

    task: str | None = None
    statuses: tuple[str, ...] = ()
    queue: str | None = None
    key: str | None = None
    error: str | None = None
    since: float | None = None
    until: float | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        found: list[ColumnElement[bool]] = []
        if self.task is not None:
            found.append(jobs.c.task == self.task)
        if self.statuses:
            found.append(jobs.c.status.in_(self.statuses))
        if self.queue is not None:
            found.append(jobs.c.queue == self.queue)
        if self.key is not None:
            found.append(
                or_(
                    jobs.c.idempotency_key == self.key,
                    jobs.c.limits.contains(json.dumps(self.key), autoescape=True),
                )
            )
        if self.error is not None:
            found.append(jobs.c.error.contains(self.error, autoescape=True))
        if self.since is not None:
            found.append(jobs.c.created_at >= self.since)
        if self.until is not None:
            found.append(jobs.c.created_at < self.until)
        return found


def _after(connection: Connection, job_id: str | None) -> list[ColumnElement[bool]]:
    """The keyset condition for the page after ``job_id`` (newest first)."""
    if job_id is None:
        return []
    created = connection.execute(select(jobs.c.created_at).where(jobs.c.id == job_id)).scalar()
    if created is None:
        raise ConfigError("after", f"no job with id {job_id!r} to page after")
    return [tuple_(jobs.c.created_at, jobs.c.id) < tuple_(created, job_id)]


def cancel_in(connection: Connection, job_ids: Sequence[str], now: float) -> list[str]:
    """Cancel those of ``job_ids`` that have not finished, in ``connection``'s
    transaction; return them. A running attempt keeps its lease and slots until it ends."""
    rows = connection.execute(
        select(jobs.c.id, jobs.c.status)
        .where(jobs.c.id.in_(job_ids), jobs.c.status.not_in(TERMINAL))
        .order_by(jobs.c.id)
        .with_for_update()
    ).all()
    if not rows:
        return []
    ids = [row.id for row in rows]
    connection.execute(
        update(jobs)
        .where(jobs.c.id.in_(ids))
        .values(status="cancelled", finished_at=now, blocked_on=None)
    )
    for row in rows:
        if row.status == "sleeping":
            steps.remove_waits(connection, row.id)
    return ids


def _matches(match: str | None, data: Any) -> bool:
    """Whether event ``data`` has each ``path: value`` of the job's ``cancel_match``
    (values compared as text, as keys are stored)."""
    if not match:
        return True
    for path, expected in json.loads(match).items():
        value: Any = data
        for part in str(path).split("."):
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        if str(value) != str(expected):
            return False
    return True


class Operating(Database):
    """Operator actions on jobs, pauses, and events (see ``Store``)."""

    def list_jobs(self, where: JobFilter, limit: int, after: str | None = None) -> list[JobRow]:
        """Up to ``limit`` jobs matching ``where``, newest first, after the job ``after``."""
        with self._read() as connection:
            rows = connection.execute(
                select(jobs)
                .where(*where.conditions(), *_after(connection, after))
                .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                .limit(limit)
            ).all()
        return [JobRow(**row._asdict()) for row in rows]

    def count_jobs(self, where: JobFilter) -> int:
        with self._read() as connection:
            count = connection.execute(
                select(func.count()).select_from(jobs).where(*where.conditions())
            ).scalar()
        return int(count or 0)

    def job_ids(self, where: JobFilter, limit: int, after: str | None = None) -> list[str]:
        """The ids of the next ``limit`` jobs matching ``where`` (for bulk actions)."""
        with self._read() as connection:
            return list(
                connection.execute(
                    select(jobs.c.id)
                    .where(*where.conditions(), *_after(connection, after))
                    .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                    .limit(limit)
                ).scalars()
            )

    def cancel(self, job_id: str, now: float) -> bool:
        """Cancel a job that has not finished; return false if it had.

        A queued or sleeping job never runs. A running attempt keeps its lease and its
        concurrency slots until it has really ended (its worker learns of the cancel and
        stops it at its next step boundary); its outcome is then discarded.
        """
        return bool(self.cancel_many([job_id], now))

    def cancel_many(self, job_ids: Sequence[str], now: float) -> list[str]:
        """Cancel those of ``job_ids`` that have not finished; return them."""
        if not job_ids:
            return []
        with self._write() as connection:
            cancelled = cancel_in(connection, job_ids, now)
        if cancelled:
            self._notify_changed()
        return cancelled

    def retry(self, job_ids: Sequence[str], now: float) -> list[str]:
        """Queue again, due now, those of ``job_ids`` that failed or were cancelled and
        whose last attempt has ended; their completed steps stay, and their attempt
        budget starts afresh. Returns them."""
        if not job_ids:
            return []
        with self._write() as connection:
            retried = list(
                connection.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_(job_ids),
                        jobs.c.status.in_(("failed", "cancelled")),
                        jobs.c.lease_owner.is_(None),
                    )
                    .values(
                        status="queued",
                        run_at=now,
                        finished_at=None,
                        result=None,
                        blocked_on=None,
                        attempt_base=jobs.c.attempts,
                    )
                    .returning(jobs.c.id)
                ).scalars()
            )
            if retried:
                self._notify_other_processes(connection)
        if retried:
            self._wake()
        return retried

    def replay(self, job_id: str, new_id: str, now: float, from_step: str | None = None) -> bool:
        """A new job ``new_id`` from ``job_id``'s input, due now, naming it as the job it
        replays; with ``from_step``, the steps completed before that one are copied, so
        the replay starts there. Returns false when ``job_id`` does not exist; raises
        ``ConfigError`` for a step it never ran."""
        with self._write() as connection:
            original = connection.execute(select(jobs).where(jobs.c.id == job_id)).first()
            if original is None:
                return False
            copied: list[Any] = []
            if from_step is not None:
                done = connection.execute(
                    select(step_rows)
                    .where(step_rows.c.job_id == job_id)
                    .order_by(step_rows.c.position)
                ).all()
                names = [row.name for row in done]
                if from_step not in names:
                    raise ConfigError(
                        "from_step", f"job {job_id} has no step {from_step!r}; it has {names}"
                    )
                before = done[: names.index(from_step)]
                copied = [row for row in before if row.status == "succeeded"]
            connection.execute(
                jobs.insert().values(
                    id=new_id,
                    task=original.task,
                    queue=original.queue,
                    priority=original.priority,
                    status="queued",
                    payload=original.payload,
                    attempts=0,
                    run_at=now,
                    created_at=now,
                    limits=original.limits,
                    replay_of=job_id,
                    cancel_on=original.cancel_on,
                    cancel_match=original.cancel_match,
                )
            )
            if copied:
                connection.execute(
                    step_rows.insert(),
                    [{**row._asdict(), "job_id": new_id} for row in copied],
                )
            self._notify_other_processes(connection)
        self._wake()
        return True

    def pause(self, kind: str, name: str, now: float) -> None:
        """Pause a task or a queue (``kind``): no worker claims its jobs until resumed."""
        stmt = self._insert(pauses).values(kind=kind, name=name, paused_at=now)
        with self._write() as connection:
            connection.execute(stmt.on_conflict_do_nothing(index_elements=["kind", "name"]))

    def resume(self, kind: str, name: str) -> bool:
        """Resume a paused task or queue; return whether it was paused."""
        with self._write() as connection:
            resumed = connection.execute(
                delete(pauses).where(pauses.c.kind == kind, pauses.c.name == name)
            ).rowcount
            if resumed:
                self._notify_other_processes(connection)
        if resumed:
            self._wake()
        return bool(resumed)

    def paused(self) -> dict[str, set[str]]:
        """The paused names, by kind (``task``, ``queue``)."""
        with self._read() as connection:
            rows = connection.execute(select(pauses.c.kind, pauses.c.name)).all()
        found: dict[str, set[str]] = {kind: set() for kind in PAUSE_KINDS}
        for row in rows:
            found.setdefault(row.kind, set()).add(row.name)
        return found

    def known_tasks(self, now: float, within: float) -> set[str]:
        """The tasks some worker that renewed its heartbeat within ``within`` s runs."""
        with self._read() as connection:
            lists = connection.execute(
                select(workers.c.tasks).where(workers.c.heartbeat_at >= now - within)
            ).scalars()
            return {name for listed in lists if listed for name in json.loads(listed)}

    def send_event(
        self, event_id: str, name: str, data: str, now: float
    ) -> tuple[list[str], list[str]]:
        """Store an event, wake every job waiting for it whose match it meets, and cancel
        every unfinished job whose ``cancel_on`` it is (and whose match it meets).
        Returns the ids woken and the ids cancelled."""
        with self._write() as connection:
            woken = steps.deliver(connection, self._insert, event_id, name, data, now)
            candidates = connection.execute(
                select(jobs.c.id, jobs.c.cancel_match).where(
                    jobs.c.cancel_on == name, jobs.c.status.not_in(TERMINAL)
                )
            ).all()
            parsed = json.loads(data)
            chosen = [row.id for row in candidates if _matches(row.cancel_match, parsed)]
            cancelled = cancel_in(connection, chosen, now) if chosen else []
            if woken:
                self._notify_other_processes(connection)
        if woken:
            self._wake()
        if cancelled:
            self._notify_changed()
        return woken, cancelled
