"""What a caller sees of a job: ``JobInfo`` (a snapshot), its attempts and its steps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from .serialization import loads
from .store import AttemptRow, JobRow
from .store.steps import StepRow

JobStatus = Literal["queued", "running", "sleeping", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


@dataclass(frozen=True)
class AttemptInfo:
    """An attempt that did not succeed: ``outcome`` is ``retry``, ``failed`` or ``lost``."""

    attempt: int
    outcome: str
    worker_id: str | None
    started_at: datetime | None
    finished_at: datetime
    error: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: AttemptRow) -> AttemptInfo:
        return cls(
            attempt=row.attempt,
            outcome=row.outcome,
            worker_id=row.worker_id,
            started_at=_time(row.started_at),
            finished_at=_time(row.finished_at) or datetime.now(timezone.utc),
            error=None if row.error is None else json.loads(row.error),
        )


@dataclass(frozen=True)
class StepInfo:
    """One step of a job: ``status`` is ``succeeded``, ``failed`` or ``waiting``."""

    name: str
    status: str
    attempts: int
    started_at: datetime
    finished_at: datetime | None
    result: Any
    error: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: StepRow) -> StepInfo:
        waiting = row.status == "waiting"
        return cls(
            name=row.name,
            status=row.status,
            attempts=row.attempts,
            started_at=_time(row.started_at) or datetime.now(timezone.utc),
            finished_at=_time(row.finished_at),
            result=None if row.result is None or waiting else loads(row.result),
            error=None if row.error is None else json.loads(row.error),
        )


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job.

    ``result`` is the task's return value once ``succeeded``; ``error`` is the latest
    failed attempt's ``{"type", "message", "traceback"}``. Times are UTC. ``replay_of``
    names the job this one replays. In listings, ``task_unknown`` flags a queued job
    whose task no live worker has registered (a rolling deploy, a renamed task): it
    waits, and is never failed for it.
    """

    id: str
    task: str
    status: JobStatus
    attempts: int
    queue: str
    priority: int
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: dict[str, Any] | None
    idempotency_key: str | None
    replay_of: str | None = None
    task_unknown: bool = False
    # Deadlines (``start_within``: until the job has run; ``finish_within``).
    start_by: datetime | None = None
    finish_by: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_row(cls, row: JobRow) -> JobInfo:
        return cls(
            id=row.id,
            task=row.task,
            status=row.status,  # type: ignore[arg-type]
            attempts=row.attempts,
            queue=row.queue,
            priority=row.priority,
            created_at=_time(row.created_at),  # type: ignore[arg-type]
            run_at=_time(row.run_at),  # type: ignore[arg-type]
            started_at=_time(row.started_at),
            finished_at=_time(row.finished_at),
            result=None if row.result is None else loads(row.result),
            error=None if row.error is None else json.loads(row.error),
            idempotency_key=row.idempotency_key,
            replay_of=row.replay_of,
            start_by=_time(row.start_by),
            finish_by=_time(row.finish_by),
        )
