"""What an operator does to jobs, from Python, the CLI and the dashboard alike: list them,
cancel, retry and replay them (one, or every job matching a filter), pause and resume
tasks and queues.

``Operations`` is the part of the ``Reliable`` façade that does it; each action is one
store operation (a batch at a time for bulk ones), and the attempts of this process
hear of a cancel at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any

from .errors import ConfigError, JobNotFound
from .handles import JobHandle
from .jobs import TERMINAL_STATUSES, JobInfo
from .registry import Registry
from .store.operator import BATCH, JobFilter

STATUSES = ("queued", "running", "sleeping", *sorted(TERMINAL_STATUSES))
# Listings return at most this many jobs a page.
MAX_PAGE = 1000

Filter = dict[str, Any]
# Called by a bulk action after each batch: (jobs looked at so far, jobs matched).
Progress = Callable[[int, int], None]


def _time(value: datetime | float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigError(name, "expected an aware datetime (with a tzinfo)")
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(name, f"expected a datetime or epoch seconds, got {value!r}")


def job_filter(
    *,
    task: str | None = None,
    status: str | Iterable[str] | None = None,
    queue: str | None = None,
    key: str | None = None,
    error: str | None = None,
    since: datetime | float | None = None,
    until: datetime | float | None = None,
) -> JobFilter:
    """A ``JobFilter`` from the keyword arguments of ``Reliable.jobs``; raises
    ``ConfigError`` naming a bad one."""
    statuses: tuple[str, ...] = ()
    if status is not None:
        statuses = (status,) if isinstance(status, str) else tuple(status)
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise ConfigError("status", f"{unknown[0]!r} is not one of {', '.join(STATUSES)}")
    for name, value in (("task", task), ("queue", queue), ("key", key), ("error", error)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(name, f"expected a non-empty string, got {value!r}")
    return JobFilter(
        task, statuses, queue, key, error, _time(since, "since"), _time(until, "until")
    )


class Operations(Registry):
    """Listings and actions on jobs (see ``Reliable``)."""

    def jobs(
        self,
        task: str | None = None,
        status: str | Iterable[str] | None = None,
        queue: str | None = None,
        key: str | None = None,
        error: str | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> list[JobInfo]:
        """Jobs newest first, a page of at most ``limit`` (1 to 1,000) after the job
        ``after`` (the last id of the previous page): the same cost at any depth.

        Filters: ``task``; ``status`` (one or several); ``queue``; ``key`` (an
        idempotency key or a limit key value); ``error`` (text in the last error);
        ``since``/``until`` (``created_at``, aware datetimes or epoch seconds). A queued
        job whose task no live worker runs has ``task_unknown`` set. Raises
        ``ConfigError`` naming a bad argument.
        """
        if not isinstance(limit, int) or not 0 < limit <= MAX_PAGE:
            raise ConfigError("limit", f"expected 1 to {MAX_PAGE}, got {limit!r}")
        where = job_filter(
            task=task, status=status, queue=queue, key=key, error=error, since=since, until=until
        )
        store = self.runtime.store
        rows = store.list_jobs(where, limit, after)
        known: set[str] | None = None
        found = []
        for row in rows:
            info = JobInfo.from_row(row)
            if info.status == "queued":
                if known is None:
                    known = store.known_tasks(
                        self.runtime.clock.now(), self.runtime.settings.lease_seconds
                    )
                if info.task not in known:
                    info = replace(info, task_unknown=True)
            found.append(info)
        return found

    def retry(self, job_id: str) -> bool:
        """Run a failed or cancelled job again, now: the same job, its completed steps
        kept, with its retries counted afresh. Returns false when it is not failed or
        cancelled, or its cancelled attempt is still winding down; raises
        ``JobNotFound``."""
        if self.runtime.store.get_status(job_id) is None:
            raise JobNotFound(job_id)
        return bool(self.runtime.store.retry([job_id], self.runtime.clock.now()))

    def replay(self, job_id: str, from_step: str | None = None) -> JobHandle[Any]:
        """A new job from the same input as ``job_id``, due now; the original stays as it
        was, and the new one names it (``JobInfo.replay_of``). With ``from_step``, the
        steps completed before that one are copied, so the replay starts there. Raises
        ``JobNotFound``, and ``ConfigError`` for a step the job never ran."""
        new_id = uuid.uuid4().hex
        if not self.runtime.store.replay(job_id, new_id, self.runtime.clock.now(), from_step):
            raise JobNotFound(job_id)
        return JobHandle(self.runtime, new_id)

    def cancel_jobs(
        self, *, dry_run: bool = False, progress: Progress | None = None, **filters: Any
    ) -> int:
        """Cancel every unfinished job matching ``filters`` (those of ``jobs``), in
        batches; return how many. ``dry_run``: only count them. ``progress(done,
        total)`` is called after each batch (``done`` jobs of ``total`` looked at)."""
        where = job_filter(**filters)
        if not where.statuses:
            where = replace(where, statuses=("queued", "running", "sleeping"))
        return self._bulk(where, dry_run, self._cancel_batch, progress)

    def retry_jobs(
        self, *, dry_run: bool = False, progress: Progress | None = None, **filters: Any
    ) -> int:
        """Retry every failed or cancelled job matching ``filters``; return how many
        (``dry_run``: only count them; ``progress`` as for ``cancel_jobs``)."""
        where = job_filter(**filters)
        chosen = where.statuses or ("failed", "cancelled")
        retryable = tuple(s for s in chosen if s in ("failed", "cancelled"))
        where = replace(where, statuses=retryable)
        if not retryable:
            return 0
        now = self.runtime.clock.now()
        return self._bulk(
            where, dry_run, lambda ids: len(self.runtime.store.retry(ids, now)), progress
        )

    def replay_jobs(
        self, *, dry_run: bool = False, progress: Progress | None = None, **filters: Any
    ) -> int:
        """Replay every job matching ``filters`` (new jobs from their input); return how
        many (``dry_run``: only count them; ``progress`` as for ``cancel_jobs``)."""
        where = job_filter(**filters)
        now = self.runtime.clock.now()

        def replay(ids: list[str]) -> int:
            store = self.runtime.store
            return sum(store.replay(job_id, uuid.uuid4().hex, now) for job_id in ids)

        return self._bulk(where, dry_run, replay, progress)

    def _cancel_batch(self, ids: list[str]) -> int:
        cancelled = self.runtime.store.cancel_many(ids, self.runtime.clock.now())
        return len(self.runtime.cancelled(cancelled))

    def _bulk(
        self,
        where: JobFilter,
        dry_run: bool,
        act: Callable[[list[str]], int],
        progress: Progress | None,
    ) -> int:
        """Apply ``act`` to every job ``where`` selects, a batch at a time (snapshotted by
        keyset first, so jobs the action creates are not visited)."""
        store = self.runtime.store
        if dry_run:
            return store.count_jobs(where)
        ids: list[str] = []
        after = None
        while batch := store.job_ids(where, BATCH, after):
            ids += batch
            after = batch[-1]
        acted = 0
        for start in range(0, len(ids), BATCH):
            acted += act(ids[start : start + BATCH])
            if progress is not None:
                progress(min(start + BATCH, len(ids)), len(ids))
        return acted

    def pause(self, *, task: str | None = None, queue: str | None = None) -> None:
        """Pause a task or a queue, durably: no worker claims its jobs until
        ``resume`` (every worker process sees it within a second); running attempts go
        on, and nothing is lost. Raises ``ConfigError`` unless exactly one is given."""
        kind, name = _one(task, queue)
        self.runtime.store.pause(kind, name, self.runtime.clock.now())
        self.runtime.paused(fresh=True)

    def resume(self, *, task: str | None = None, queue: str | None = None) -> bool:
        """Resume a paused task or queue; return whether it was paused."""
        kind, name = _one(task, queue)
        resumed = self.runtime.store.resume(kind, name)
        self.runtime.paused(fresh=True)
        return resumed

    def paused(self) -> dict[str, list[str]]:
        """The paused tasks and queues: ``{"tasks": [...], "queues": [...]}``."""
        found = self.runtime.paused(fresh=True)
        return {"tasks": sorted(found.get("task", ())), "queues": sorted(found.get("queue", ()))}


def _one(task: str | None, queue: str | None) -> tuple[str, str]:
    if (task is None) == (queue is None):
        raise ConfigError("task", "give either task= or queue=")
    kind, name = ("task", task) if task is not None else ("queue", queue)
    if not isinstance(name, str) or not 0 < len(name) <= 200:
        raise ConfigError(kind, f"expected a name of 1 to 200 characters, got {name!r}")
    return kind, name
