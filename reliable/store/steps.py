"""Steps, event waits and events in the store's transactions.

Every write here is fenced: it lands only while the attempt that makes it still holds
the job's lease, so an attempt that lost its lease (its worker froze and the job was
taken over) cannot record a step the new attempt does not know about.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    delete,
    literal,
    select,
    update,
)

from .database import Database
from .schema import (
    HOLDS_LEASE,
    IS_RUNNING,
    events,
    jobs,
    steps,
    waits,
)


@dataclass(frozen=True, slots=True)
class StepRow:
    """A step as stored: ``status`` is ``succeeded``, ``failed`` or ``waiting`` (a sleep
    or an event wait in progress)."""

    job_id: str
    name: str
    position: int
    status: str
    attempts: int
    result: str | None
    error: str | None
    started_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class WaitRow:
    job_id: str
    step: str
    event: str
    match: str | None
    created_at: float
    expires_at: float | None


def lease_state(connection: Connection, job_id: str, attempt: int, worker_id: str) -> str | None:
    """The job's status while ``worker_id``'s ``attempt`` holds its lease (``running``,
    or ``cancelled`` while the attempt winds down), locking the row; ``None`` when the
    attempt lost the lease."""
    status: str | None = connection.execute(
        select(jobs.c.status)
        .where(
            jobs.c.id == job_id,
            HOLDS_LEASE,
            jobs.c.attempts == attempt,
            jobs.c.lease_owner == worker_id,
        )
        .with_for_update()
    ).scalar()
    return status


def load(connection: Connection, job_id: str) -> dict[str, StepRow]:
    rows = connection.execute(select(steps).where(steps.c.job_id == job_id)).all()
    return {row.name: StepRow(**row._asdict()) for row in rows}


def save(connection: Connection, insert: Any, row: StepRow) -> None:
    """Record a step; a step that already succeeded is never overwritten."""
    values = asdict(row)
    stmt = insert(steps).values(**values)
    connection.execute(
        stmt.on_conflict_do_update(
            index_elements=[steps.c.job_id, steps.c.name],
            set_={k: stmt.excluded[k] for k in values if k not in ("job_id", "name")},
            where=steps.c.status != "succeeded",
        )
    )


def save_fenced(
    connection: Connection, insert: Any, row: StepRow, attempt: int, worker_id: str
) -> bool:
    """``save`` and the lease check in one statement (so it can run in autocommit):
    the row is written only while the attempt holds the lease of a running job.
    Returns whether it was (read from ``RETURNING``: PostgreSQL reports no row count
    for an ``INSERT ... SELECT`` that inserted nothing)."""
    holder = (
        select(jobs.c.id)
        .where(
            jobs.c.id == row.job_id,
            IS_RUNNING,
            jobs.c.attempts == attempt,
            jobs.c.lease_owner == worker_id,
        )
        .exists()
    )
    values = asdict(row)
    source = select(*(literal(v, steps.c[k].type).label(k) for k, v in values.items())).where(
        holder
    )
    stmt = insert(steps).from_select(list(values), source)
    stmt = stmt.on_conflict_do_update(
        index_elements=[steps.c.job_id, steps.c.name],
        set_={k: stmt.excluded[k] for k in values if k not in ("job_id", "name")},
        where=steps.c.status != "succeeded",
    ).returning(steps.c.name)
    return connection.execute(stmt).first() is not None


def get_wait(connection: Connection, job_id: str, step: str) -> WaitRow | None:
    row = connection.execute(
        select(waits).where(waits.c.job_id == job_id, waits.c.step == step)
    ).first()
    return None if row is None else WaitRow(**row._asdict())


def add_wait(connection: Connection, insert: Any, wait: WaitRow) -> None:
    connection.execute(
        insert(waits)
        .values(
            job_id=wait.job_id,
            step=wait.step,
            event=wait.event,
            match=wait.match,
            created_at=wait.created_at,
            expires_at=wait.expires_at,
        )
        .on_conflict_do_nothing(index_elements=[waits.c.job_id, waits.c.step])
    )


def remove_wait(connection: Connection, job_id: str, step: str) -> None:
    connection.execute(delete(waits).where(waits.c.job_id == job_id, waits.c.step == step))


def has_waits(connection: Connection, job_id: str) -> bool:
    found = connection.execute(select(waits.c.job_id).where(waits.c.job_id == job_id)).first()
    return found is not None


def _lookup(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


_MISSING = object()


def matches(match: dict[str, Any] | None, data: Any) -> bool:
    """Whether event ``data`` has every ``path: value`` of ``match``."""
    if not match:
        return True
    return all(_lookup(data, path) == value for path, value in match.items())


def deliver(
    connection: Connection,
    insert: Any,
    event_id: str,
    name: str,
    data_text: str,
    now: float,
) -> list[str]:
    """Store an event and complete every matching wait; return the woken job ids.

    The jobs' rows are locked before their waits, in id order, as an attempt parking
    on a wait (and its settle) locks the job first: whichever of the two commits
    second sees what the other did, so a wake-up is never lost between them.
    """
    connection.execute(
        events.insert().values(id=event_id, name=name, data=data_text, created_at=now)
    )
    data = json.loads(data_text)
    waiting = connection.execute(select(waits).where(waits.c.event == name)).all()
    chosen = sorted({wait.job_id for wait in waiting if matches(_match(wait.match), data)})
    if not chosen:
        return []
    connection.execute(
        select(jobs.c.id).where(jobs.c.id.in_(chosen)).order_by(jobs.c.id).with_for_update()
    ).all()
    woken: list[str] = []
    pending = connection.execute(
        select(waits)
        .where(waits.c.event == name, waits.c.job_id.in_(chosen))
        .order_by(waits.c.job_id, waits.c.step)
        .with_for_update()
    ).all()
    for wait in pending:
        if not matches(_match(wait.match), data):
            continue
        complete_wait(connection, wait.job_id, wait.step, data_text, now)
        # A parked job is due now; one still settling is made due by its settle.
        connection.execute(
            update(jobs)
            .where(jobs.c.id == wait.job_id, jobs.c.status == "sleeping")
            .values(run_at=now)
        )
        woken.append(wait.job_id)
    return woken


def _match(text: str | None) -> dict[str, Any] | None:
    return json.loads(text) if text else None


def wake_orphaned_sleepers(connection: Connection, now: float, limit: int = 500) -> int:
    """Make due the sleeping jobs that wait for nothing any more: no sleep or event
    wait of theirs is in progress (a wake-up lost to a race, repaired); returns how many."""
    waiting = (
        select(steps.c.job_id)
        .where(steps.c.job_id == jobs.c.id, steps.c.status == "waiting")
        .exists()
    )
    orphans = (
        connection.execute(
            select(jobs.c.id)
            .where(jobs.c.status == "sleeping", jobs.c.run_at > now, ~waiting)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    if orphans:
        connection.execute(
            update(jobs)
            .where(jobs.c.id.in_(orphans), jobs.c.status == "sleeping")
            .values(run_at=now)
        )
    return len(orphans)


def remove_waits(connection: Connection, job_id: str) -> None:
    connection.execute(delete(waits).where(waits.c.job_id == job_id))


def complete_wait(
    connection: Connection, job_id: str, step: str, result: str | None, now: float
) -> None:
    """End a wait: its step succeeds with ``result`` (the event's data, or null)."""
    connection.execute(
        update(steps)
        .where(steps.c.job_id == job_id, steps.c.name == step, steps.c.status == "waiting")
        .values(status="succeeded", result=result, finished_at=now)
    )
    remove_wait(connection, job_id, step)


class Stepping(Database):
    """Steps, event waits and events (see ``Store``)."""

    def load_steps(self, job_id: str) -> dict[str, StepRow]:
        with self._read() as connection:
            return load(connection, job_id)

    def record_step(
        self, attempt: int, worker_id: str, row: StepRow, wait: WaitRow | None = None
    ) -> str | None:
        """Save a step (and, for an event wait, the wait) while the attempt holds its
        lease. Returns the job's status then: ``running``; ``cancelled`` (the step was
        saved, but not a wait: the attempt is to stop); ``None`` when the attempt lost
        its lease, and nothing was written."""
        if wait is None:  # the common case: one statement, one round trip
            with self._single_statement() as connection:
                if save_fenced(connection, self._insert, row, attempt, worker_id):
                    return "running"
        with self._write() as connection:
            state = lease_state(connection, row.job_id, attempt, worker_id)
            if state is None or (state == "cancelled" and wait is not None):
                return state
            save(connection, self._insert, row)
            if wait is not None:
                add_wait(connection, self._insert, wait)
        return state

    def end_wait(
        self, job_id: str, attempt: int, worker_id: str, step: str, result: str | None, now: float
    ) -> str | None:
        """Complete a sleep, or an event wait that timed out, while holding the lease;
        returns the job's status as ``record_step`` does."""
        with self._write() as connection:
            state = lease_state(connection, job_id, attempt, worker_id)
            if state is not None:
                complete_wait(connection, job_id, step, result, now)
        return state

    def get_wait(self, job_id: str, step: str) -> WaitRow | None:
        with self._read() as connection:
            return get_wait(connection, job_id, step)

    def get_steps(self, job_id: str) -> list[StepRow]:
        rows = self.load_steps(job_id)
        return sorted(rows.values(), key=lambda row: (row.position, row.started_at))
