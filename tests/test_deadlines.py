"""Deadlines: ``start_within`` (a job not started in time fails without running) and
``finish_within`` (across all its retries and sleeps), with an injected clock."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest
import tenacity

from reliable import (
    DeadlineExceeded,
    JobFailed,
    JobInfo,
    ManualClock,
    Reliable,
    sleep,
    step,
    wait_for_event,
)


def iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, tz=timezone.utc).isoformat(timespec="seconds")


def deadline_error(info: JobInfo) -> str:
    assert info.status == "failed"
    assert info.error is not None
    assert info.error["type"] == f"reliable.errors.{DeadlineExceeded.__name__}"
    return str(info.error["message"])


def test_a_job_not_started_within_its_deadline_fails_without_running(
    rel: Reliable, clock: ManualClock
) -> None:
    ran: list[int] = []
    failed: list[JobInfo] = []

    @rel.task(start_within="5m", on_failure=failed.append)
    def report(n: int) -> None:
        ran.append(n)

    start_by = clock.now() + 300
    late = report.enqueue(1)
    clock.advance(301)
    assert rel.run_until_idle() == 1
    message = deadline_error(rel.get_job(late.id))
    assert "start_within" in message and iso(start_by) in message
    assert "did not run" in message
    assert ran == []
    assert [job.id for job in failed] == [late.id]
    with pytest.raises(JobFailed, match="start_within"):
        late.result(timeout=1)


def test_a_job_started_in_time_runs_and_its_retries_are_not_held_to_the_start_deadline(
    rel: Reliable, clock: ManualClock
) -> None:
    calls: list[float] = []

    @rel.task(start_within="1m", retries=2, backoff=tenacity.wait_fixed(600))
    def flaky() -> str:
        calls.append(clock.now())
        if len(calls) < 2:
            raise ConnectionError("down")
        return "ok"

    handle = flaky.enqueue()
    info = rel.get_job(handle.id)
    assert info.start_by is not None and info.start_by.timestamp() == clock.now() + 60
    assert info.finish_by is None
    clock.advance(59)
    assert rel.run_until_idle() == 1
    assert handle.status() == "queued"
    assert rel.get_job(handle.id).start_by is None  # met: the retries are free of it
    clock.advance(600)  # the retry is due long after the start deadline
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=1) == "ok"
    assert len(calls) == 2


def test_a_sleeping_job_resumes_after_its_start_deadline(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(start_within="1m")
    def napper() -> str:
        step("before", lambda: None)
        sleep("nap", "1h")
        return "woke"

    handle = napper.enqueue()
    rel.run_until_idle()
    assert handle.status() == "sleeping"
    clock.advance(3600)
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=1) == "woke"


def test_start_within_counts_from_when_the_job_is_due_and_a_call_may_set_its_own(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(start_within="1m")
    def report(n: int) -> int:
        return n

    delayed = report.options(delay="1h").enqueue(1)
    relaxed = report.options(start_within="2h").enqueue(2)
    strict = report.options(start_within="30s", delay="1h").enqueue(3)
    clock.advance(3600 + 45)
    assert rel.run_until_idle() == 3
    assert delayed.result(timeout=1) == 1  # due at 1h, started 45 s later: within 1 min
    assert relaxed.result(timeout=1) == 2
    assert "start_within" in deadline_error(rel.get_job(strict.id))


def test_finish_within_fails_the_job_when_a_retry_would_come_after_it(
    rel: Reliable, clock: ManualClock
) -> None:
    failed: list[JobInfo] = []

    @rel.task(
        finish_within="10m", retries=9, backoff=tenacity.wait_fixed(240), on_failure=failed.append
    )
    def flaky() -> None:
        raise ConnectionError("down")

    finish_by = clock.now() + 600
    handle = flaky.enqueue()
    for _ in range(3):  # attempts at 0, 4 and 8 minutes; the next would be at 12
        assert rel.run_until_idle() == 1
        clock.advance(240)
    info = rel.get_job(handle.id)
    message = deadline_error(info)
    assert info.attempts == 3
    assert "finish_within" in message and iso(finish_by) in message
    assert "ConnectionError: down" in message
    assert [job.id for job in failed] == [handle.id]
    assert rel.run_until_idle() == 0


def test_finish_within_fails_a_sleep_that_would_end_after_it(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(finish_within="1h")
    def napper() -> None:
        sleep("nap", "2h")

    handle = napper.enqueue()
    assert rel.run_until_idle() == 1
    message = deadline_error(rel.get_job(handle.id))
    assert "wake-up" in message and "finish_within" in message


def test_an_event_wait_ends_at_the_finish_deadline(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(finish_within="1h")
    def approval(order: int) -> object:
        return wait_for_event("approved", "approval", match={"order": order})

    in_time, too_late = approval.enqueue(1), approval.enqueue(2)
    assert rel.run_until_idle() == 2
    assert rel.get_job(too_late.id).run_at.timestamp() == clock.now() + 3600
    clock.advance(1800)
    rel.send_event("approval", {"order": 1})
    assert rel.run_until_idle() == 1
    assert in_time.result(timeout=1) == {"order": 1}
    clock.advance(1800)
    assert too_late.status() == "sleeping"
    assert rel.run_until_idle() == 1
    assert "finish_within" in deadline_error(rel.get_job(too_late.id))


def test_a_running_attempt_stops_at_the_finish_deadline(rel: Reliable, clock: ManualClock) -> None:
    done: list[str] = []

    @rel.task(finish_within="1m", retries=3)
    def long_job() -> None:
        step("one", lambda: (done.append("one"), clock.advance(61)))
        step("two", done.append, "two")

    handle = long_job.enqueue()
    assert rel.run_until_idle() == 1
    message = deadline_error(rel.get_job(handle.id))
    assert "stopped at the job's finish_within deadline" in message
    assert done == ["one"]


def test_a_job_reaching_an_attempt_past_its_finish_deadline_fails_without_running(
    rel: Reliable, clock: ManualClock
) -> None:
    ran: list[int] = []

    @rel.task
    def work(n: int) -> None:
        ran.append(n)

    handle = work.options(finish_within="1m").enqueue(1)
    on_time = work.options(finish_within="1m").enqueue(2)
    assert rel.get_job(on_time.id).status == "queued"
    clock.advance(60)
    assert rel.run_until_idle() == 2
    assert "finish_within" in deadline_error(rel.get_job(handle.id))
    assert ran == []


def test_a_worker_fails_a_late_job_and_calls_on_failure(rel: Reliable, clock: ManualClock) -> None:
    failed = threading.Event()
    ran: list[int] = []

    @rel.task(start_within="10s", on_failure=lambda info: failed.set())
    def report(n: int) -> None:
        ran.append(n)

    handle = report.enqueue(1)
    clock.advance(11)
    rel.start_worker(threads=1)
    assert failed.wait(10)
    assert "start_within" in deadline_error(rel.get_job(handle.id))
    assert ran == []


def test_an_attempt_that_returns_after_the_finish_deadline_fails_the_job(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(finish_within="1m")
    def slow() -> str:
        clock.advance(61)
        return "late"

    handle = slow.enqueue()
    assert rel.run_until_idle() == 1
    assert "finish_within" in deadline_error(rel.get_job(handle.id))
