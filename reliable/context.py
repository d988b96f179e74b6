"""What a running attempt knows about itself: ``current_job()``, and why it must stop.

A thread cannot be killed, so an attempt that must end early (its timeout passed, its
job was cancelled, its worker lost the lease or is shutting down) is told so through
its ``AttemptControl``; ``step()``, ``sleep()`` and ``wait_for_event()`` raise
``StopAttempt`` at their next boundary, and code of its own can look at
``current_job().stopping``. Until the function really returns, the attempt keeps its
lease and its concurrency slots.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from .clock import Clock
from .errors import ReliableError

T = TypeVar("T")

# Why an attempt is told to stop.
CANCELLED = "cancelled"
TIMED_OUT = "timed out"
LEASE_LOST = "lease lost"
SHUTDOWN = "worker shutdown"


class StopAttempt(BaseException):
    """Raised at a step boundary once the attempt must stop; ``reason`` says why.

    Derived from ``BaseException`` so that a task's ``except Exception`` does not
    swallow it. The attempt's outcome follows from the reason: a timeout is a failed
    attempt (retried as the task says), a cancel ends the job ``cancelled``, a shutdown
    gives the job back uncounted, and a lost lease discards what the attempt did.
    """

    def __init__(self, reason: str, job_id: str) -> None:
        super().__init__(f"job {job_id}: the attempt must stop ({reason})")
        self.reason = reason
        self.job_id = job_id


class AttemptControl:
    """The stop signal of one attempt, shared by its thread and its worker.

    ``deadline`` is the clock time (epoch seconds) at which the attempt's timeout
    (or its job's finish deadline) passes, or ``None``. ``stop(reason)`` is
    idempotent: the first reason stays. Callbacks given to ``on_stop`` run once, in the
    stopping thread (an async attempt cancels its coroutine this way).
    """

    def __init__(self, job_id: str, clock: Clock, deadline: float | None = None) -> None:
        self.job_id = job_id
        self.clock = clock
        self.deadline = deadline
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def stop(self, reason: str) -> bool:
        """Tell the attempt to stop; return whether this call was the first to."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        return True

    def on_stop(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if self.reason is None:
                self._callbacks.append(callback)
                return
        callback()

    @property
    def timed_out(self) -> bool:
        if self.reason == TIMED_OUT:
            return True
        return self.deadline is not None and self.clock.now() >= self.deadline

    def why(self) -> str | None:
        """The reason to stop now, if there is one (a passed deadline counts)."""
        if self.reason is not None:
            return self.reason
        return TIMED_OUT if self.timed_out else None

    def check(self) -> None:
        """Raise ``StopAttempt`` when the attempt must stop: the boundary of a step."""
        reason = self.why()
        if reason is not None:
            raise StopAttempt(reason, self.job_id)


@dataclass(frozen=True)
class JobContext:
    """The job an attempt belongs to.

    ``attempt`` counts from 1. ``keys`` holds the limit key values resolved when the job
    was enqueued, and ``captured`` what a capture hook stored with it. ``deadline``,
    ``cancelled``, ``timed_out`` and ``stopping`` let long-running code end early on its
    own; ``step()`` does it for you at every step boundary.
    """

    id: str
    task: str
    attempt: int
    queue: str
    keys: dict[str, str] = field(default_factory=dict)
    captured: Any = None
    control: AttemptControl | None = field(default=None, repr=False, compare=False)

    @property
    def deadline(self) -> datetime | None:
        """When the attempt must end (UTC): its timeout, or the job's ``finish_within``
        deadline if that comes first; ``None`` without either."""
        if self.control is None or self.control.deadline is None:
            return None
        return datetime.fromtimestamp(self.control.deadline, tz=timezone.utc)

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled while this attempt runs."""
        return self.control is not None and self.control.reason == CANCELLED

    @property
    def timed_out(self) -> bool:
        """Whether the attempt has run past its timeout."""
        return self.control is not None and self.control.timed_out

    @property
    def stopping(self) -> bool:
        """Whether the attempt should end now: cancelled, timed out, its lease lost, or
        its worker shutting down."""
        return self.control is not None and self.control.why() is not None


_current: ContextVar[JobContext | None] = ContextVar("reliable_current_job", default=None)


def current_job() -> JobContext:
    """Return the job whose attempt is running in this thread or task.

    Raises ``ReliableError`` when called outside a job.
    """
    job = _current.get()
    if job is None:
        raise ReliableError("current_job() was called outside a job")
    return job


async def to_the_end(work: Awaitable[T]) -> T:
    """Await ``work`` (a function run in a thread, typically) to its end: when the
    awaiting task is cancelled (its attempt timed out, cancelled, shut down), it still
    waits until ``work`` has ended and only then raises ``CancelledError``. A thread
    cannot be stopped, and an attempt keeps its job, lease and slots while its function
    still runs; a result that comes after the cancel is discarded."""
    running = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(running)
        except asyncio.CancelledError as exc:
            if running.done():
                raise
            cancelled = exc  # told to stop: the thread runs on, and the attempt with it
            continue
        if cancelled is not None:
            raise cancelled
        return result
