"""Cron schedules: a task enqueued at each tick of a cron expression (``@rel.cron``).

Every process that declares a schedule enqueues its due ticks (each worker, on a
timer of its own, and ``run_until_idle``); no process leads. A tick makes exactly one
job however many processes and machines enqueue it at once: the job's idempotency key
is the schedule's name and the tick's time, unique in the database and inserted in the
job's own transaction. Which ticks were dealt with is stored with the schedule, so a
process that starts, or comes back after downtime, knows what it missed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .calls import EnqueueOptions
from .cron import Cron
from .durations import Duration, parse_duration
from .errors import ConfigError, RateLimited
from .runtime import Runtime
from .store.schedules import ScheduleRow
from .tasks import Task

log = logging.getLogger("reliable.schedules")

CATCH_UP = ("once", "all")
# Missed ticks enqueued in one round with catch_up="all"; the next round goes on.
MAX_TICKS_PER_ROUND = 500


def _time(instant: float | None) -> datetime | None:
    return None if instant is None else datetime.fromtimestamp(instant, tz=timezone.utc)


@dataclass(frozen=True)
class Schedule:
    """A task enqueued at every tick of ``cron``; see ``Reliable.cron``.

    ``catch_up`` says what becomes of ticks missed while nothing ran: ``"once"`` (they
    collapse into one job, for the newest) or ``"all"`` (a job each). A tick later than
    ``max_lateness`` seconds is skipped either way.
    """

    name: str
    cron: Cron
    task: Task[Any, Any]
    catch_up: str = "once"
    max_lateness: float | None = None

    @classmethod
    def build(
        cls,
        task: Task[Any, Any],
        expression: str,
        *,
        tz: str = "UTC",
        catch_up: str = "once",
        max_lateness: Duration | None = None,
    ) -> Schedule:
        """Check every option now; ``ConfigError`` names the bad one (``cron``, ``tz``,
        ``catch_up``, ``max_lateness``), or says the function needs arguments."""
        cron = Cron(expression, tz)
        if catch_up not in CATCH_UP:
            raise ConfigError("catch_up", f"expected 'once' or 'all', got {catch_up!r}")
        lateness = None
        if max_lateness is not None:
            lateness = parse_duration(max_lateness, name="max_lateness")
            if lateness <= 0:
                raise ConfigError("max_lateness", f"expected a duration > 0, got {max_lateness!r}")
        if task.signature is not None:
            try:
                task.signature.bind()
            except TypeError:
                raise ConfigError(
                    "cron",
                    f"{task.name} is called with no arguments at each tick: {task.signature}",
                ) from None
        return cls(task.name, cron, task, catch_up, lateness)

    def due(self, last: float, now: float) -> tuple[list[float], float]:
        """The ticks to enqueue at ``now``, when those up to ``last`` were dealt with,
        and the newest tick they settle (``last`` when none is due)."""
        floor = None if self.max_lateness is None else now - self.max_lateness
        if self.catch_up == "once":
            newest = self.cron.latest_until(now)
            if newest is None or newest <= last:
                return [], last
            return ([] if floor is not None and newest < floor else [newest]), newest
        after = last if floor is None else max(last, floor - 1.0)
        ticks = self.cron.between(after, now, MAX_TICKS_PER_ROUND)
        if len(ticks) == MAX_TICKS_PER_ROUND:
            newest = ticks[-1]
        else:
            newest = max(last, self.cron.latest_until(now) or last)
        if floor is not None:
            ticks = [tick for tick in ticks if tick >= floor]
        return ticks, newest


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as ``Reliable.schedules()`` shows it.

    ``last_run_at`` is the tick of the newest job it made (``last_job_id``, whose status
    is ``last_status``); ``next_run_at`` the next tick it will enqueue (a missed one
    still to catch up, or the next to come). Times are UTC.
    """

    name: str
    cron: str
    timezone: str
    catch_up: str
    max_lateness: float | None
    last_run_at: datetime | None
    last_job_id: str | None
    last_status: str | None
    next_run_at: datetime


class Timetable:
    """The schedules of one application, and the enqueuing of their due ticks.

    ``enqueue_due`` costs no database access until a tick is due by this process's
    reckoning; then it reads what every process has dealt with, enqueues the rest and
    records it.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.schedules: dict[str, Schedule] = {}
        self._last: dict[str, float] = {}  # ticks dealt with, as last read or written
        self._next_due: float | None = None
        self._lock = threading.Lock()

    def add(self, schedule: Schedule) -> None:
        """Add ``schedule``; its name (its task's) must be unused."""
        with self._lock:
            if schedule.name in self.schedules:
                raise ConfigError("name", f"a schedule named {schedule.name!r} exists already")
            self.schedules[schedule.name] = schedule
            self._next_due = self.runtime.clock.now()  # registered at the next round

    @property
    def next_due(self) -> float | None:
        """When a tick is next due by this process's reckoning (UTC epoch seconds)."""
        return self._next_due

    def enqueue_due(self) -> int:
        """Enqueue the ticks that are due; return how many jobs were made.

        A schedule first seen here is stored as starting at its next tick. A tick a
        rate limit refuses is skipped, with a warning. Raises ``StoreError``.
        """
        with self._lock:
            now = self.runtime.clock.now()
            if self._next_due is None or now < self._next_due:
                return 0
            store = self.runtime.store
            new = [s for s in self.schedules.values() if s.name not in self._last]
            if new:
                rows = [
                    ScheduleRow(s.name, s.cron.expression, s.cron.tz, now, s.cron.next_after(now))
                    for s in new
                ]
                self._last.update(store.register_schedules(rows, now))
            self._last.update(store.schedule_ticks(list(self.schedules)))
            made = 0
            for schedule in self.schedules.values():
                made += self._enqueue(schedule, now)
            self._next_due = min(
                s.cron.next_after(self._last[n]) for n, s in self.schedules.items()
            )
            return made

    def _enqueue(self, schedule: Schedule, now: float) -> int:
        last = self._last[schedule.name]
        ticks, newest = schedule.due(last, now)
        if newest <= last:
            return 0
        made = 0
        job_id = run_at = None
        for tick in ticks:
            options = EnqueueOptions(run_at=tick, idempotency_key=schedule.cron.label(tick))
            try:
                handle = schedule.task.enqueue_with(
                    options, (), {}, idempotency_scope=f"schedule:{schedule.name}"
                )
            except RateLimited as exc:
                log.warning(
                    "schedule %s: tick %s skipped: %s", schedule.name, options.idempotency_key, exc
                )
                continue
            made += handle.created
            job_id, run_at = handle.id, tick
        self.runtime.store.advance_schedule(
            schedule.name, newest, schedule.cron.next_after(newest), job_id, run_at
        )
        self._last[schedule.name] = newest
        return made

    def infos(self) -> list[ScheduleInfo]:
        """Every schedule of this application with its last and next run."""
        stored = {row.name: row for row in self.runtime.store.list_schedules()}
        now = self.runtime.clock.now()
        infos = []
        for name, schedule in sorted(self.schedules.items()):
            row = stored.get(name)
            last = now if row is None else row.last_tick_at
            infos.append(
                ScheduleInfo(
                    name=name,
                    cron=schedule.cron.expression,
                    timezone=schedule.cron.tz,
                    catch_up=schedule.catch_up,
                    max_lateness=schedule.max_lateness,
                    last_run_at=_time(row.last_run_at if row else None),
                    last_job_id=row.last_job_id if row else None,
                    last_status=row.last_status if row else None,
                    next_run_at=datetime.fromtimestamp(
                        schedule.cron.next_after(last), tz=timezone.utc
                    ),
                )
            )
        return infos
