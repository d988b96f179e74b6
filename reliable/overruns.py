"""Attempts that run past their timeout.

A thread cannot be killed: such an attempt is told to stop (it stops at its next step
boundary), keeps its job's lease and concurrency slots until its function returns, and
its thread is replaced so that the worker's other jobs go on. Until it returns it is
reported in the log, once per lease period, and listed by ``Worker.overdue()``.
Everything here runs with the worker's lock held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .context import TIMED_OUT
from .handover import Running

log = logging.getLogger("reliable.worker")


class Overruns:
    """The worker's attempts past their timeout; ``count`` of them hold a thread that was
    replaced. ``replace_thread`` starts a thread in the place of one; ``report_every`` is
    the seconds between reports of an attempt still running."""

    def __init__(
        self,
        running: dict[str, Running],
        replace_thread: Callable[[], None],
        report_every: float,
    ) -> None:
        self.running = running
        self._replace_thread = replace_thread
        self._report_every = report_every
        self.count = 0

    def expire(self, now: float) -> None:
        """Tell the attempts whose deadline (``time.monotonic()``) passed to stop."""
        for running in self.running.values():
            deadline = running.deadline
            if deadline is None or now < deadline or running.control is None:
                continue
            running.overdue = True
            running.reported = now
            running.control.stop(TIMED_OUT)
            self.count += 1
            job = running.job
            log.warning(
                "job %s: attempt %d exceeded its timeout of %gs; it keeps its lease and "
                "concurrency slots until its function returns (it stops at its next step)",
                job.id,
                job.attempt,
                running.timeout or 0.0,
            )
            self._replace_thread()

    def returned(self, running: Running, now: float) -> None:
        """An overdue attempt's function returned: its thread retires."""
        self.count -= 1
        log.warning(
            "job %s: attempt %d returned %.1fs after its timeout; its slots and lease are "
            "given back now",
            running.job.id,
            running.job.attempt,
            self.over(running, now),
        )

    def report(self, now: float) -> float:
        """Report the attempts still running past their timeout that are due for it;
        return when to report again."""
        soonest = now + self._report_every
        for running in self.running.values():
            if not running.overdue or running.started is None:
                continue
            if now >= running.reported + self._report_every:
                running.reported = now
                log.warning(
                    "job %s: attempt %d is still running, %.0fs past its timeout of %gs",
                    running.job.id,
                    running.job.attempt,
                    self.over(running, now),
                    running.timeout or 0.0,
                )
            soonest = min(soonest, running.reported + self._report_every)
        return soonest

    def listed(self, now: float) -> list[tuple[str, int, float]]:
        """(job id, attempt, seconds past its timeout) of each."""
        return [
            (r.job.id, r.job.attempt, self.over(r, now))
            for r in self.running.values()
            if r.overdue and r.started is not None
        ]

    @staticmethod
    def over(running: Running, now: float) -> float:
        return now - (running.started or now) - (running.timeout or 0.0)
