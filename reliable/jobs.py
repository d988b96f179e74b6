"""What a caller sees of a job: ``JobInfo`` (a snapshot) and ``JobHandle`` (a reference)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from .errors import JobCancelled, JobFailed, JobNotFound, JobTimeout
from .serialization import loads
from .store import AttemptRow, JobRow
from .store.records import RateState
from .store.steps import StepRow

if TYPE_CHECKING:
    from .app import Reliable

R = TypeVar("R")

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
    failed attempt's ``{"type", "message", "traceback"}``. Times are UTC.
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
        )


class JobHandle(Generic[R]):
    """A reference to a committed job: its ``id``, its ``status()``, its ``result()``.

    ``created`` is false when an idempotency key matched an existing job (then
    ``replayed`` is true), or a debounced call joined the pending one. ``rates`` is the
    state of the task's rate limits after admitting the job.
    """

    def __init__(
        self,
        app: Reliable,
        job_id: str,
        *,
        created: bool = True,
        replayed: bool = False,
        rates: tuple[RateState, ...] = (),
    ) -> None:
        self.app = app
        self.id = job_id
        self.created = created
        self.replayed = replayed
        self.rates = rates

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def status(self) -> JobStatus:
        """The job's current status; raises ``JobNotFound`` if it was purged."""
        status = self.app.store.get_status(self.id)
        if status is None:
            raise JobNotFound(self.id)
        return status  # type: ignore[return-value]

    def info(self) -> JobInfo:
        return self.app.get_job(self.id)

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job is terminal; return its ``JobInfo``.

        Raises ``JobTimeout`` after ``timeout`` seconds (``None``: wait for ever); its
        message says so when no worker could have run the job: none runs in this
        process, and none has renewed its heartbeat in the database within
        ``RELIABLE_LEASE_SECONDS``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            info = self.app.get_job(self.id)
            if info.finished:
                return info
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out(timeout or 0.0)
                pause = min(pause, remaining)
            # Woken at once by a worker in this process; other processes are polled.
            self.app.store.wait_for_change(pause)
            pause = min(pause * 2, 0.25)

    def _timed_out(self, timeout: float) -> JobTimeout:
        error = JobTimeout(self.id, timeout)
        hint = self._no_worker_hint()
        if hint is not None:
            # JobTimeout's message is built from its fields; the hint is added to it.
            error.args = (f"{error}: {hint}",)
        return error

    def _no_worker_hint(self) -> str | None:
        """Why nobody ran the job, when nobody could have: no worker runs in this
        process and none has renewed its heartbeat within a lease period."""
        worker = self.app.worker
        if worker is not None and worker.running:
            return None
        within = self.app.settings.lease_seconds
        if self.app.store.live_workers(self.app.clock.now(), within):
            return None
        return (
            "no worker runs in this process and none has renewed its heartbeat in the "
            f"database for {within:g} s; start one with rel.start_worker(), or run "
            "`reliable worker module:rel`"
        )

    def result(self, timeout: float | None = None) -> R:
        """Wait for the job and return the task's return value.

        Raises ``JobFailed`` (with the last error) if it failed, ``JobCancelled`` if it
        was cancelled, ``JobTimeout`` if it is not finished within ``timeout`` seconds
        (see ``wait``).
        """
        info = self.wait(timeout)
        if info.status == "failed":
            raise JobFailed(self.id, info.error)
        if info.status == "cancelled":
            raise JobCancelled(self.id)
        return info.result  # type: ignore[no-any-return]
