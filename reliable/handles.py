"""``JobHandle``: a caller's reference to a committed job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import JobCancelled, JobFailed, JobNotFound, JobTimeout, ReliableError
from .jobs import JobInfo, JobStatus
from .runtime import Runtime
from .store.records import RateState

R = TypeVar("R")


class JobHandle(Generic[R]):
    """A reference to a committed job: its ``id``, its ``status()``, its ``result()``.

    ``created`` is false when an idempotency key matched an existing job (then
    ``replayed`` is true), or a debounced call joined the pending one. ``rates`` is the
    state of the task's rate limits after admitting the job.

    ``pending`` is true while the job this call created was written in a caller's
    transaction that is still open (``task.options(session=...)``): nobody else can
    see it yet, and a rollback would undo it. Reading the job's status or waiting for it then raises
    ``ReliableError`` (commit first); after a rollback the job does not exist
    (``JobNotFound``).
    """

    def __init__(
        self,
        runtime: Runtime,
        job_id: str,
        *,
        created: bool = True,
        replayed: bool = False,
        rates: tuple[RateState, ...] = (),
        pending: Callable[[], bool] | None = None,
    ) -> None:
        self.runtime = runtime
        self.id = job_id
        self.created = created
        self.replayed = replayed
        self.rates = rates
        self._pending = pending

    @property
    def pending(self) -> bool:
        """Whether the job's transaction (the caller's) is still open, uncommitted."""
        return self._pending is not None and self._pending()

    def _check_committed(self) -> None:
        if self.pending:
            raise ReliableError(
                f"job {self.id} was written in a transaction that is still open: commit "
                "it (session.commit()) before reading or waiting for the job"
            )

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def status(self) -> JobStatus:
        """The job's current status; raises ``JobNotFound`` if it was purged (or its
        transaction rolled back), ``ReliableError`` while it is ``pending``."""
        self._check_committed()
        status = self.runtime.store.get_status(self.id)
        if status is None:
            raise JobNotFound(self.id)
        return status  # type: ignore[return-value]

    def info(self) -> JobInfo:
        self._check_committed()
        return self.runtime.get_job(self.id)

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job is terminal; return its ``JobInfo``.

        Raises ``JobTimeout`` after ``timeout`` seconds (``None``: wait for ever); its
        message says so when no worker could have run the job: none runs in this
        process, and none has renewed its heartbeat in the database within
        ``RELIABLE_LEASE_SECONDS``.
        """
        self._check_committed()
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while True:
            info = self.runtime.get_job(self.id)
            if info.finished:
                return info
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out(timeout or 0.0)
                pause = min(pause, remaining)
            # Woken at once by a worker in this process; other processes are polled.
            self.runtime.store.wait_for_change(pause)
            pause = min(pause * 2, 0.25)

    def _timed_out(self, timeout: float) -> JobTimeout:
        return JobTimeout(self.id, timeout, detail=self._no_worker_hint())

    def _no_worker_hint(self) -> str | None:
        """Why nobody ran the job, when nobody could have: no worker runs in this
        process and none has renewed its heartbeat within a lease period."""
        worker = self.runtime.worker
        if worker is not None and worker.running:
            return None
        within = self.runtime.settings.lease_seconds
        if self.runtime.store.live_workers(self.runtime.clock.now(), within):
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
