"""What a running attempt knows about itself: ``current_job()``."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .errors import ReliableError


@dataclass(frozen=True)
class JobContext:
    """The job an attempt belongs to.

    ``attempt`` counts from 1. ``keys`` holds the limit key values resolved when the job
    was enqueued, and ``captured`` what a capture hook stored with it.
    """

    id: str
    task: str
    attempt: int
    queue: str
    keys: dict[str, str] = field(default_factory=dict)
    captured: Any = None


_current: ContextVar[JobContext | None] = ContextVar("reliable_current_job", default=None)


def current_job() -> JobContext:
    """Return the job whose attempt is running in this thread or task.

    Raises ``ReliableError`` when called outside a job.
    """
    job = _current.get()
    if job is None:
        raise ReliableError("current_job() was called outside a job")
    return job
