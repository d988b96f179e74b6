"""The timekeeper: what a worker does as time passes, on a thread of its own.

It enqueues the cron ticks that come due (waking at the next tick, and at least every
``RELIABLE_POLL_INTERVAL``, so a clock moved by hand is seen too), and removes finished
jobs older than ``RELIABLE_RESULT_TTL``: one batch at a time, paced, with the due ticks
looked at between batches, so neither the dispatcher's claims nor the schedules wait
for a long purge.
"""

from __future__ import annotations

import logging
import random
import time

from .background import Background, backoff
from .errors import StoreError
from .retention import BATCH_JOBS, FINISHED, pause_after
from .runtime import Runtime
from .schedules import Timetable

log = logging.getLogger("reliable.worker")

# How often a worker looks for finished jobs past RELIABLE_RESULT_TTL when the last
# look found fewer than a batch (with jitter, so workers do not look at once).
RETENTION_INTERVAL_SECONDS = 60.0


class Timekeeper(Background):
    """A thread that enqueues the due ticks of ``timetable`` and applies retention."""

    def __init__(self, runtime: Runtime, timetable: Timetable | None, worker_id: str) -> None:
        self.runtime = runtime
        self.timetable = timetable
        self.worker_id = worker_id
        super().__init__(f"reliable-time-{worker_id}")

    def _run(self) -> None:
        settings = self.runtime.settings
        clock = self.runtime.clock
        next_purge = time.monotonic()
        failures = 0
        while not self._closed.is_set():
            try:
                if self.timetable is not None:
                    self.timetable.enqueue_due()
                if settings.result_ttl is not None and time.monotonic() >= next_purge:
                    started = time.monotonic()
                    store = self.runtime.store
                    batch = BATCH_JOBS[store.dialect]
                    removed = store.purge_finished(
                        clock.now() - settings.result_ttl, FINISHED, batch
                    )
                    if removed:
                        log.info("worker %s: removed %d finished jobs", self.worker_id, removed)
                    elapsed = time.monotonic() - started
                    next_purge = time.monotonic() + (
                        pause_after(elapsed)
                        if removed == batch
                        else RETENTION_INTERVAL_SECONDS * random.uniform(0.75, 1.25)
                    )
                failures = 0
            except StoreError as exc:
                failures += 1
                log.warning("worker %s: %s; the timekeeper tries again", self.worker_id, exc)
            except Exception:  # the thread must outlive any one failure
                failures += 1
                log.exception("worker %s: timekeeper error", self.worker_id)
            self._closed.wait(max(0.0, self._wait(failures, next_purge)))

    def _wait(self, failures: int, next_purge: float) -> float:
        """Seconds until the next round: after failures, the backoff, however overdue
        the purge or a tick is (they are what failed); else until the next poll, purge
        or tick."""
        if failures:
            return backoff(failures, 5.0)
        wait = self.runtime.settings.poll_interval
        if self.runtime.settings.result_ttl is not None:
            wait = min(wait, next_purge - time.monotonic())
        due = self.timetable.next_due if self.timetable is not None else None
        if due is not None:
            wait = min(wait, due - self.runtime.clock.now())
        return wait
