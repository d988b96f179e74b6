"""``Runtime``: what every part of one application shares while it runs.

Its settings and clock, its job store (opened on first use), the hooks its web routes
call, and what runs in this process: the worker, and the attempts ``run_until_idle``
runs. Tasks, steps, attempts, workers and the status resource receive the runtime they
need; none of them knows the ``Reliable`` façade built on top of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .clock import Clock
from .context import CANCELLED, AttemptControl
from .errors import JobNotFound
from .jobs import JobInfo
from .settings import Settings
from .store import Store
from .telemetry import Counters

# How long a worker trusts the pauses it read: a pause (or resume) in another process
# takes effect within this (docs/operating.md: within a second). An idle worker reads
# them at its poll, once a second by default, so a job that wakes it up within the
# second is claimed without waiting for that read.
PAUSES_CHECK_SECONDS = 1.0

# May the caller (a framework request) read or cancel this job? See
# ``Reliable.status_access``.
StatusAccess = Callable[[Any, JobInfo, str], bool]


class LocalWorker(Protocol):
    """The worker running in this process, as the runtime sees it."""

    @property
    def running(self) -> bool: ...

    def cancelled(self, job_ids: Iterable[str]) -> None: ...


class Runtime:
    """Settings, clock, store, hooks, and what runs in this process.

    The store is opened, and its schema upgraded (``RELIABLE_AUTO_MIGRATE``), on first
    use of ``store``.
    """

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.capture_hook: Callable[[Any], Any] | None = None
        self.status_hook: StatusAccess | None = None
        self.worker: LocalWorker | None = None
        self.inline: dict[str, AttemptControl] = {}  # attempts of run_until_idle
        self.counters = Counters()  # this process's attempts, for metrics
        self._store: Store | None = None
        self.engine: Any = None  # an application's SQLAlchemy engine to share, if any
        self._lock = threading.Lock()
        self._pauses: dict[str, set[str]] = {}
        self._pauses_until = 0.0  # time.monotonic() when to read the pauses again

    @property
    def store(self) -> Store:
        """The job store, opened (and its schema upgraded) on first use."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = Store(
                        self.settings.database_url,
                        engine=self.engine,
                        pool_size=self.settings.worker_threads + 4,
                        sqlite_synchronous=self.settings.sqlite_synchronous,
                        auto_migrate=self.settings.auto_migrate,
                    )
        return self._store

    def get_job(self, job_id: str) -> JobInfo:
        """A snapshot of the job; raises ``JobNotFound``."""
        row = self.store.get_job(job_id)
        if row is None:
            raise JobNotFound(job_id)
        return JobInfo.from_row(row)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished (see ``Reliable.cancel``); the attempts of
        this process learn of it at once. Raises ``JobNotFound``."""
        if self.store.get_status(job_id) is None:
            raise JobNotFound(job_id)
        return bool(self.cancelled(self.store.cancel_many([job_id], self.clock.now())))

    def cancelled(self, job_ids: list[str]) -> list[str]:
        """Jobs were cancelled in the store: tell the attempts of this process at once."""
        for job_id in job_ids:
            inline = self.inline.get(job_id)
            if inline is not None:
                inline.stop(CANCELLED)
        if job_ids and self.worker is not None:
            self.worker.cancelled(job_ids)
        return job_ids

    def paused(self, *, fresh: bool = False) -> dict[str, set[str]]:
        """The paused tasks and queues (``{"task": ..., "queue": ...}``), read from the
        store at most every ``PAUSES_CHECK_SECONDS`` unless ``fresh``."""
        now = time.monotonic()
        if fresh or now >= self._pauses_until:
            self._pauses = self.store.paused()
            self._pauses_until = now + PAUSES_CHECK_SECONDS
        return self._pauses

    def close(self) -> None:
        """Release the store's connections (reopened on next use)."""
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
