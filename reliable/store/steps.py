"""Steps, event waits and events in the store's transactions.

Every write here is fenced: it lands only while the attempt that makes it still holds
the job's lease, so an attempt that lost its lease (its worker froze and the job was
taken over) cannot record a step the new attempt does not know about.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, delete, literal, select, update

from .schema import IS_RUNNING, events, jobs, steps, waits


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


def holds_lease(connection: Connection, job_id: str, attempt: int, worker_id: str) -> bool:
    row = connection.execute(
        select(jobs.c.id)
        .where(
            jobs.c.id == job_id,
            IS_RUNNING,
            jobs.c.attempts == attempt,
            jobs.c.lease_owner == worker_id,
        )
        .with_for_update()
    ).first()
    return row is not None


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
    the row is written only while the attempt holds the lease. Returns whether it was."""
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
    )
    return bool(connection.execute(stmt).rowcount)


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
    """Store an event and complete every matching wait; return the woken job ids."""
    connection.execute(
        events.insert().values(id=event_id, name=name, data=data_text, created_at=now)
    )
    data = json.loads(data_text)
    woken: list[str] = []
    pending = connection.execute(select(waits).where(waits.c.event == name).with_for_update()).all()
    for wait in pending:
        if not matches(json.loads(wait.match) if wait.match else None, data):
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
