"""Rate limits at enqueue: a sliding window, exact across processes. The scope's row is
locked, the admissions of the last period counted, and the job admitted only under the
limit; admissions no window can count any more are pruned by workers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    delete,
    func,
    select,
)

from ..errors import RateLimited
from .records import NewJob, RateState
from .schema import (
    rate_events,
    rate_limits,
)

_WINDOW = select(
    func.count(), func.min(rate_events.c.admitted_at), func.max(rate_events.c.admitted_at)
).where(rate_events.c.scope == bindparam("scope"), rate_events.c.admitted_at > bindparam("start"))


def admit_rates(
    connection: Connection, insert: Any, job: NewJob, now: float
) -> tuple[tuple[RateState, ...], float]:
    """Admit ``job`` under each of its rate limits, or raise ``RateLimited`` (nothing kept).

    Returns the limits' states and the admission time: ``now``, or the scope's latest
    admission if that is later (admissions of a scope are ordered by its lock).
    Admissions that left the window are deleted later, by ``prune_rate_events``.
    """
    windows: list[tuple[int, float | None]] = []
    at = now
    for check in job.rate_limits:
        # Upserting the scope's row locks it until commit: admissions of one scope
        # are decided one at a time, so the window count is exact.
        stmt = insert(rate_limits).values(
            scope=check.scope, limit=check.limit, period_seconds=check.period
        )
        connection.execute(
            stmt.on_conflict_do_update(
                index_elements=[rate_limits.c.scope],
                set_={"limit": stmt.excluded.limit, "period_seconds": stmt.excluded.period_seconds},
            )
        )
        count, oldest, latest = connection.execute(
            _WINDOW, {"scope": check.scope, "start": now - check.period}
        ).one()
        windows.append((int(count), None if oldest is None else float(oldest)))
        if latest is not None:
            at = max(at, float(latest))
    if at > now:
        # Admissions of a scope are ordered by its lock, so their times must be too: one
        # that waited behind a later admission is admitted as of that one, and its window
        # ends there. One time for all of the job's scopes.
        windows = []
        for check in job.rate_limits:
            count, oldest, _ = connection.execute(
                _WINDOW, {"scope": check.scope, "start": at - check.period}
            ).one()
            windows.append((int(count), None if oldest is None else float(oldest)))
    states: list[RateState] = []
    for check, (count, oldest) in zip(job.rate_limits, windows, strict=True):
        if count >= check.limit:
            retry_after = max(0.0, (oldest if oldest is not None else at) + check.period - at)
            raise RateLimited(
                f"rate limit {check.limit} per {check.period:g}s reached for {check.scope!r}",
                retry_after,
                state=RateState(check.scope, check.limit, check.period, 0, retry_after),
            )
        connection.execute(
            rate_events.insert().values(scope=check.scope, job_id=job.id, admitted_at=at)
        )
        reset = (oldest if oldest is not None else at) + check.period - at
        states.append(
            RateState(check.scope, check.limit, check.period, check.limit - count - 1, reset)
        )
    return tuple(states), at


# Admissions are kept a period past their window and this much more, so that no
# process whose clock is behind the pruner's still counts one that is gone.
PRUNE_MARGIN_SECONDS = 60.0


def prune_rate_events(connection: Connection, now: float) -> int:
    """Delete admissions that have left every window that could still count them."""
    period = (
        select(rate_limits.c.period_seconds)
        .where(rate_limits.c.scope == rate_events.c.scope)
        .scalar_subquery()
    )
    cutoff: Any = bindparam("now") - 2 * period - PRUNE_MARGIN_SECONDS
    result = connection.execute(
        delete(rate_events).where(rate_events.c.admitted_at <= cutoff), {"now": now}
    )
    return int(result.rowcount)
