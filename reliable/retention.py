"""Retention: finished jobs past a cut-off removed, a batch per transaction, paced so that
workers go on claiming meanwhile.

Used by each worker for ``RELIABLE_RESULT_TTL`` (see ``Timekeeper``), and by
``Reliable.purge`` and ``reliable purge`` on demand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from .errors import ConfigError
from .jobs import TERMINAL_STATUSES
from .store import Store

# Jobs removed per transaction (with their attempts, steps and keys). SQLite has one
# write lock: a claim waits out a whole batch, and its busy handler's back-off, so
# batches there are short (a few ms); on PostgreSQL a batch locks only its own rows.
# (bench.retention: claim p99 while purging, 250 a batch on SQLite, about 2 x; 100, 1.2 x.)
BATCH_JOBS = {"sqlite": 100, "postgresql": 1000}
# After a full batch a purge waits twice as long as the batch took, and at least this:
# it takes at most a third of the database's time, and claims get their turn.
MIN_PAUSE_SECONDS = 0.01

FINISHED = ("succeeded", "failed", "cancelled")


def finished_statuses(status: str | Sequence[str] | None) -> tuple[str, ...]:
    """The statuses to purge: ``None`` for every finished one, else ``status`` (one,
    a list, or comma-separated). Raises ``ConfigError`` naming ``status`` for one that
    is not final: unfinished jobs are never removed."""
    if status is None:
        return FINISHED
    names = status.split(",") if isinstance(status, str) else list(status)
    wanted = tuple(dict.fromkeys(name.strip() for name in names if name.strip()))
    wrong = [name for name in wanted if name not in TERMINAL_STATUSES]
    if not wanted or wrong:
        raise ConfigError(
            "status",
            f"only finished jobs are purged: succeeded, failed or cancelled, got {status!r}",
        )
    return wanted


def pause_after(batch_seconds: float) -> float:
    """How long to wait after a full batch that took ``batch_seconds``."""
    return max(MIN_PAUSE_SECONDS, 2 * batch_seconds)


def purge(
    store: Store,
    before: float,
    statuses: Sequence[str] = FINISHED,
    *,
    batch: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Remove the jobs that finished (with one of ``statuses``) before ``before`` (UTC
    epoch seconds), in batches of ``batch`` jobs, each its own transaction; return how
    many (``batch``: default ``BATCH_JOBS`` of the database). ``stop``, once set, ends
    it after the current batch. Raises ``StoreError``."""
    stop = stop or threading.Event()
    batch = batch or BATCH_JOBS[store.dialect]
    total = 0
    while True:
        started = time.monotonic()
        removed = store.purge_finished(before, statuses, batch)
        total += removed
        if removed < batch or stop.wait(pause_after(time.monotonic() - started)):
            return total
