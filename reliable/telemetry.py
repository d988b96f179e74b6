"""What this process's attempts tell operators: a log line as each starts and ends, a
tracing span around it, and the counters behind the metrics (attempts and outcomes,
queue wait and run time, rate-limit refusals).

``Counters`` live on the ``Runtime``; ``attempt`` wraps one attempt and feeds them.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import tracing
from .store import ClaimedJob, Outcome

log = logging.getLogger("reliable.attempts")

# Attempts counted but not yet folded into the counts, at most (see ``Counters``).
FOLD_AT = 4096
# Upper bounds (seconds) of the queue wait and run time histogram buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
           900.0, 3600.0)  # fmt: skip


@dataclass
class Histogram:
    """Observations counted per bucket (not cumulative), and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at most that)`` pairs, ``+Inf`` last."""
        pairs, running = [], 0
        for bound, count in zip([*map(repr, BUCKETS), "+Inf"], self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs


class Counters:
    """In-process counts of this process's attempts, by task (thread-safe).

    An attempt's start and end are appended to a queue (an append is atomic, and costs
    a fraction of a lock on every attempt's path); ``snapshot`` folds the queue into the
    counts, and so does the attempt that finds it long."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (task, queue wait or None, outcome or None, seconds run): None, a start.
        self._pending: deque[tuple[str, float | None, str | None, float]] = deque()
        self.started: dict[str, int] = {}
        self.ended: dict[tuple[str, str], int] = {}  # (task, outcome)
        self.waits: dict[str, Histogram] = {}
        self.runs: dict[str, Histogram] = {}
        self.refusals: dict[str, int] = {}  # rate-limit scope -> refused enqueues

    def attempt_started(self, task: str, wait: float | None) -> None:
        self._pending.append((task, wait, None, 0.0))

    def attempt_ended(self, task: str, outcome: str, seconds: float) -> None:
        self._pending.append((task, None, outcome, seconds))
        if len(self._pending) >= FOLD_AT:
            self._fold()

    def refused(self, scope: str) -> None:
        with self._lock:
            self.refusals[scope] = self.refusals.get(scope, 0) + 1

    def _fold(self) -> None:
        with self._lock:
            pending = self._pending
            for _ in range(len(pending)):
                task, wait, outcome, seconds = pending.popleft()
                if outcome is None:
                    self.started[task] = self.started.get(task, 0) + 1
                    if wait is not None:
                        waits = self.waits.get(task) or self.waits.setdefault(task, Histogram())
                        waits.observe(max(0.0, wait))
                else:
                    self.ended[task, outcome] = self.ended.get((task, outcome), 0) + 1
                    runs = self.runs.get(task) or self.runs.setdefault(task, Histogram())
                    runs.observe(max(0.0, seconds))

    def snapshot(
        self,
    ) -> tuple[
        dict[str, int],
        dict[tuple[str, str], int],
        dict[str, Histogram],
        dict[str, Histogram],
        dict[str, int],
    ]:
        """Copies of (started, ended, waits, runs, refusals), taken together."""
        self._fold()
        with self._lock:
            return (
                dict(self.started),
                dict(self.ended),
                {t: Histogram(list(h.counts), h.total) for t, h in self.waits.items()},
                {t: Histogram(list(h.counts), h.total) for t, h in self.runs.items()},
                dict(self.refusals),
            )


def outcome_name(outcome: Outcome) -> str:
    """How an attempt ended, in one word: ``succeeded``, ``failed``, ``retry``,
    ``sleeping``, ``cancelled`` or ``released`` (given back without counting)."""
    if outcome.status == "queued":
        return "retry" if outcome.counted else "released"
    return outcome.status


@contextlib.contextmanager
def attempt(counters: Counters, job: ClaimedJob) -> Iterator[Callable[[Outcome], None]]:
    """Around one attempt of ``job``: log its start, open its span, count it; the
    caller reports the ``Outcome`` through the function yielded (an attempt that
    raises instead is counted and logged as ``error``). On every attempt's path: what
    nobody listens to (debug lines, spans without a tracer provider) is skipped."""
    wait = None if job.run_at is None else job.started_at - job.run_at
    counters.attempt_started(job.task, wait)
    debug = log.isEnabledFor(logging.DEBUG)
    if debug:
        log.debug(
            "job %s (%s): attempt %d started",
            job.id,
            job.task,
            job.attempt,
            extra={**_fields(job), "event": "attempt_started", "queue_wait": wait},
        )
    began = time.monotonic()
    ended: list[Outcome] = []

    def finish(span: tracing.AttemptSpan | None) -> None:
        seconds = time.monotonic() - began
        name = outcome_name(ended[-1]) if ended else "error"
        if span is not None and ended:
            span.outcome(name, ended[-1].error)
        counters.attempt_ended(job.task, name, seconds)
        if debug:
            log.debug(
                "job %s (%s): attempt %d ended: %s in %.3fs",
                job.id,
                job.task,
                job.attempt,
                name,
                seconds,
                extra={**_fields(job), "event": "attempt_ended", "outcome": name,
                       "duration": seconds},
            )  # fmt: skip

    if not tracing.recording():
        try:
            yield ended.append
        finally:
            finish(None)
        return
    with tracing.attempt_span(job.task, job.id, job.attempt, job.trace_context) as span:
        try:
            yield ended.append
        finally:
            finish(span)


def _fields(job: ClaimedJob) -> dict[str, object]:
    return {"job_id": job.id, "task": job.task, "attempt": job.attempt}
