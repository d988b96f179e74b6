"""Cron schedules in the store: one row per schedule, shared by every process.

Which ticks of a schedule were dealt with is its row's ``last_tick_at``; that a tick
makes one job, however many processes enqueue it at once, is held by the job's
idempotency key (scope ``schedule:<name>``, the tick's time), inserted in the same
transaction as the job (see ``enqueue``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    select,
    update,
)

from .database import Database
from .schema import jobs, schedules


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """A schedule as stored: ticks up to ``last_tick_at`` are dealt with; the newest
    job it made is ``last_job_id``, for the tick ``last_run_at`` (``last_status`` is
    that job's status, or ``None`` once it was removed)."""

    name: str
    cron: str
    timezone: str
    last_tick_at: float
    next_tick_at: float
    last_run_at: float | None = None
    last_job_id: str | None = None
    last_status: str | None = None


class Scheduling(Database):
    """Cron schedules (see ``Store``)."""

    def register_schedules(self, wanted: Sequence[ScheduleRow], now: float) -> dict[str, float]:
        """Store the schedules of ``wanted`` (name, cron, timezone, next tick) that are
        new, as dealt with up to ``now``: a new schedule starts at its next tick. One
        whose expression or zone changed starts again the same way. Returns each
        schedule's ``last_tick_at``."""
        with self._write() as connection:
            stored = {
                row.name: row
                for row in connection.execute(
                    select(schedules).where(schedules.c.name.in_([w.name for w in wanted]))
                )
            }
            for want in wanted:
                row = stored.get(want.name)
                if row is None:
                    connection.execute(
                        self._insert(schedules)
                        .values(
                            name=want.name,
                            cron=want.cron,
                            timezone=want.timezone,
                            last_tick_at=now,
                            next_tick_at=want.next_tick_at,
                            created_at=now,
                        )
                        .on_conflict_do_nothing(index_elements=[schedules.c.name])
                    )
                elif (row.cron, row.timezone) != (want.cron, want.timezone):
                    connection.execute(
                        update(schedules)
                        .where(schedules.c.name == want.name)
                        .values(
                            cron=want.cron,
                            timezone=want.timezone,
                            last_tick_at=max(float(row.last_tick_at), now),
                            next_tick_at=want.next_tick_at,
                        )
                    )
        return self.schedule_ticks([w.name for w in wanted])

    def schedule_ticks(self, names: Sequence[str]) -> dict[str, float]:
        """``last_tick_at`` of the schedules ``names`` (one read)."""
        with self._read() as connection:
            rows = connection.execute(
                select(schedules.c.name, schedules.c.last_tick_at).where(
                    schedules.c.name.in_(list(names))
                )
            ).all()
        return {row.name: float(row.last_tick_at) for row in rows}

    def advance_schedule(
        self,
        name: str,
        tick_at: float,
        next_tick_at: float,
        job_id: str | None = None,
        run_at: float | None = None,
    ) -> None:
        """Ticks up to ``tick_at`` are dealt with (never moves back); ``job_id`` is the
        job made for the tick ``run_at``, if one was."""
        values: dict[str, object] = {"last_tick_at": tick_at, "next_tick_at": next_tick_at}
        if job_id is not None:
            values.update(last_job_id=job_id, last_run_at=run_at)
        with self._write() as connection:
            connection.execute(
                update(schedules)
                .where(schedules.c.name == name, schedules.c.last_tick_at < tick_at)
                .values(**values)
            )

    def list_schedules(self) -> list[ScheduleRow]:
        """Every stored schedule with the status of its newest job, by name."""
        with self._read() as connection:
            rows = connection.execute(
                select(
                    schedules.c.name,
                    schedules.c.cron,
                    schedules.c.timezone,
                    schedules.c.last_tick_at,
                    schedules.c.next_tick_at,
                    schedules.c.last_run_at,
                    schedules.c.last_job_id,
                    jobs.c.status.label("last_status"),
                )
                .select_from(schedules.outerjoin(jobs, jobs.c.id == schedules.c.last_job_id))
                .order_by(schedules.c.name)
            ).all()
        return [ScheduleRow(**row._asdict()) for row in rows]
