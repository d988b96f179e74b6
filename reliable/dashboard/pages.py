"""What each dashboard page shows, read from the ``Reliable`` and its store.

Every read is bounded (see ``reliable.store.insight``), so pages stay fast at millions
of jobs: counts stop at ``COUNT_CAP`` and say so, listings go by keyset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from ..app import Reliable
from ..errors import ConfigError, JobNotFound, SerializationError
from ..jobs import JobInfo
from ..operations import STATUSES, job_filter
from ..serialization import loads
from ..store.insight import RECENT_ROWS
from ..store.operator import JobFilter
from ..web.http import served_result
from .redact import redact_payload, redact_value
from .render import throughput_plot, timeline
from .request import first

COUNT_CAP = 10_000
PAGE_SIZE = 50
WINDOW_SECONDS = 3600.0
BUCKET_SECONDS = 60.0
FILTER_FIELDS = ("task", "status", "queue", "key", "error", "since", "until")
CANCELLABLE = ("queued", "running", "sleeping")
RETRYABLE = ("failed", "cancelled")


def shown_count(count: int, cap: int = COUNT_CAP) -> str:
    return f"{cap:,}+" if count > cap else f"{count:,}"


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def overview(rel: Reliable) -> dict[str, Any]:
    store = rel.store
    now = rel.clock.now()
    counts = store.count_by_status_bounded(COUNT_CAP)
    by_task = store.recent_by_task()
    buckets = int(WINDOW_SECONDS / BUCKET_SECONDS)
    start = (now // BUCKET_SECONDS + 1) * BUCKET_SECONDS - WINDOW_SECONDS
    ok = [0] * buckets
    bad = [0] * buckets
    for index, status, count in store.finished_per_bucket(start, BUCKET_SECONDS):
        if 0 <= index < buckets:
            (bad if status == "failed" else ok)[index] += count
    waits = store.recent_waits()
    series = [(start + i * BUCKET_SECONDS, ok[i], bad[i]) for i in range(buckets)]
    finished = sum(ok) + sum(bad)
    return {
        "counts": {status: shown_count(counts.get(status, 0)) for status in STATUSES},
        "by_task": sorted(by_task.items()),
        "statuses": STATUSES,
        "plot": throughput_plot(series),
        "finished": f"{finished:,}{'+' if finished >= RECENT_ROWS else ''}",
        "failed": sum(bad),
        "wait_p50": percentile(waits, 0.50),
        "wait_p99": percentile(waits, 0.99),
        "sampled": len(waits),
        "paused": rel.paused(),
    }


@dataclass
class Listing:
    """The list page: its filter as typed, the jobs of this page, and the next page."""

    values: dict[str, str]
    jobs: list[JobInfo] = field(default_factory=list)
    count: str = "0"
    after: str | None = None
    next_after: str | None = None
    problem: str | None = None

    def query(self, **extra: str) -> str:
        """The filter (and ``extra``) as a query string for links and redirects."""
        pairs = {k: v for k, v in {**self.values, **extra}.items() if v}
        return urlencode(pairs)


def parse_time(raw: str, name: str) -> float | None:
    """A filter time: an ISO 8601 date or time (UTC when it names no zone)."""
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise ConfigError(
            name, f"expected a date or time such as 2026-01-31T12:00, got {raw!r}"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def filters(values: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of ``Reliable.jobs`` from the filter form; raises
    ``ConfigError`` naming a bad field."""
    found: dict[str, Any] = {
        name: values[name]
        for name in ("task", "status", "queue", "key", "error")
        if values.get(name)
    }
    for name in ("since", "until"):
        value = parse_time(values.get(name, ""), name)
        if value is not None:
            found[name] = value
    return found


def filter_values(args: Mapping[str, list[str]]) -> dict[str, str]:
    return {name: first(args, name)[:300] for name in FILTER_FIELDS}


def listing(rel: Reliable, args: Mapping[str, list[str]]) -> Listing:
    page = Listing(filter_values(args))
    page.after = first(args, "after") or None
    try:
        chosen = filters(page.values)
        where: JobFilter = job_filter(**chosen)
        page.jobs = rel.jobs(**chosen, limit=PAGE_SIZE, after=page.after)
        page.count = shown_count(rel.store.count_matching(where, COUNT_CAP))
    except ConfigError as exc:
        page.problem = str(exc)
        return page
    if len(page.jobs) == PAGE_SIZE:
        page.next_after = page.jobs[-1].id
    return page


def _payload(raw: str) -> Any:
    try:
        return loads(raw)
    except (SerializationError, ValueError, TypeError):
        try:
            return json.loads(raw)
        except ValueError:
            return "(unreadable)"


def job_page(rel: Reliable, job_id: str) -> dict[str, Any] | None:
    """The job page's data, or ``None`` when there is no such job."""
    try:
        info = rel.get_job(job_id)
    except JobNotFound:
        return None
    row = rel.store.get_job(job_id)
    redact = rel.settings.redact_headers
    payload = None if row is None else redact_payload(_payload(row.payload), redact)
    steps = rel.get_steps(job_id)
    now = rel.clock.now()
    spans = [
        (
            step.name,
            step.started_at.timestamp(),
            None if step.finished_at is None else step.finished_at.timestamp(),
            step.status,
        )
        for step in steps
    ]
    result = None
    if info.status == "succeeded":
        result = redact_value(served_result(info.result, redact))
    return {
        "job": info,
        "payload": payload,
        "attempts": rel.get_attempts(job_id),
        "steps": steps,
        "timeline": timeline(spans, now) if spans else None,
        "result": result,
        "can_retry": info.status in RETRYABLE,
        "can_cancel": info.status in CANCELLABLE,
        "can_replay": info.finished,
    }


def flow(rel: Reliable) -> dict[str, Any]:
    return {"state": rel.flow_state(), "paused": rel.paused(), "tasks": sorted(rel.tasks)}


def workers(rel: Reliable) -> dict[str, Any]:
    now = rel.clock.now()
    within = rel.settings.lease_seconds
    found = rel.store.list_workers()
    return {
        "workers": [(w, now - w.heartbeat_at, now - w.heartbeat_at <= within) for w in found],
    }


def schedules(rel: Reliable) -> dict[str, Any]:
    return {"schedules": rel.schedules()}
