"""A rate-limit admission decided after waiting for the scope's lock stays within the
limit, also when an admission with a later clock reading pruned the window meanwhile."""

from __future__ import annotations

import bisect
import contextlib

from sqlalchemy import text

from reliable import ManualClock, RateLimited, Reliable


def test_an_admission_that_waited_for_the_lock_does_not_overfill_its_window(
    db_url: str,
) -> None:
    """Two processes on one scope (3 per 10 s). A reads its clock (t=10.05), then waits
    for the scope's lock while B (t=10.25) admits a job, pruning the admissions up to
    t=0.25. Whether A is then refused, or admitted with a later time, no 10 s window of
    the stored jobs' ``created_at`` may hold more than 3 (admitting it at 10.05 would
    put 4 in (0.05, 10.05]: 0.1, 0.2, 5.0 and A)."""
    early, late = ManualClock(0.0), ManualClock(0.0)
    a, b = (Reliable(db_url, clock=c, embedded_worker=False) for c in (early, late))
    for app in (a, b):

        @app.task(name="notify", rate_limit="3/10s")
        def notify(n: int) -> None: ...

    try:
        for at in (0.1, 0.2, 5.0):
            late.set(at)
            b.tasks["notify"].enqueue(0)
        late.set(10.25)
        b.tasks["notify"].enqueue(1)  # (0.25, 10.25] holds 5.0 only: admitted
        early.set(10.05)  # A's reading, taken before B committed
        with contextlib.suppress(RateLimited):  # refused or admitted: both may be right
            a.tasks["notify"].enqueue(2)
        with a.store.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT created_at FROM reliable_jobs ORDER BY created_at")
            ).all()
        times = [float(row.created_at) for row in rows]
        fullest = max(i + 1 - bisect.bisect_right(times, t - 10.0) for i, t in enumerate(times))
        assert fullest <= 3, times
    finally:
        a.close()
        b.close()
