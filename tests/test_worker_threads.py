"""The embedded worker: threads in this process, graceful stop, and the promises that hold
when a function ignores its timeout, is cancelled, or outlives a stop: a cap is never
exceeded, one job never runs twice at once, a completed step never runs again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import tenacity

from reliable import Reliable, current_job, step

WAIT = 20.0


@pytest.fixture
def live(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False, poll_interval=0.2, lease_seconds=5)
    yield app
    app.close()


def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Wait for ``condition`` (the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


class Overlap:
    """Counts attempts inside a section at once; ``peak`` is the most seen together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = self.peak = 0

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self.now -= 1


def test_worker_threads_run_jobs_and_retries(live: Reliable) -> None:
    calls: list[int] = []

    @live.task(retries=3, backoff=tenacity.wait_fixed(0.05))
    def flaky(n: int) -> int:
        calls.append(n)
        if calls.count(n) < 2:
            raise RuntimeError("first try fails")
        return n * 10

    handles = [flaky.enqueue(n) for n in range(20)]
    live.start_worker(threads=4)
    try:
        assert [h.result(timeout=WAIT) for h in handles] == [n * 10 for n in range(20)]
    finally:
        live.stop_worker(timeout=5)
    assert all(live.get_job(h.id).attempts == 2 for h in handles)


def test_a_job_enqueued_while_idle_is_woken_not_polled(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False, poll_interval=600)

    @app.task
    def hello() -> str:
        return "hi"

    app.start_worker(threads=2)
    try:
        until(lambda: app.worker is not None and app.worker.running, "the worker runs")
        # Polling would take ten minutes: only a wake-up finishes it in time.
        assert hello.enqueue().result(timeout=WAIT) == "hi"
    finally:
        app.stop_worker(timeout=5)
        app.close()


def test_an_attempt_past_its_timeout_keeps_its_job_until_it_returns(live: Reliable) -> None:
    release = threading.Event()
    noticed = threading.Event()
    overlap = Overlap()
    attempts: list[int] = []

    @live.task(timeout=0.3, retries=1, backoff=tenacity.wait_fixed(0))
    def stuck() -> str:
        with overlap:
            attempts.append(current_job().attempt)
            if len(attempts) == 1:
                until(lambda: current_job().timed_out, "the attempt is told it timed out")
                noticed.set()
                release.wait(WAIT)  # ignores its timeout
                return "late"
            return "second"

    @live.task
    def quick() -> str:
        return "quick"

    live.start_worker(threads=1)
    try:
        handle = stuck.enqueue()
        assert noticed.wait(WAIT)
        worker = live.worker
        assert worker is not None
        until(lambda: worker.overdue(), "the worker reports the overdue attempt")
        # Its thread was replaced, so the pool keeps working...
        assert quick.enqueue().result(timeout=WAIT) == "quick"
        # ...but the job is still this attempt's: no retry runs beside it.
        assert (handle.status(), live.get_job(handle.id).attempts) == ("running", 1)
        release.set()
        assert handle.result(timeout=WAIT) == "second"  # the late "late" was discarded
    finally:
        release.set()
        live.stop_worker(timeout=5)
    assert overlap.peak == 1 and attempts == [1, 2]
    [timed_out] = live.get_attempts(handle.id)
    assert timed_out.error is not None and "timeout" in timed_out.error["message"]


def test_a_timed_out_attempt_keeps_its_concurrency_slot_until_it_returns(live: Reliable) -> None:
    release = threading.Event()
    overlap = Overlap()

    @live.task(concurrency=1, timeout=0.3, retries=0)
    def capped(stuck: bool) -> str:
        with overlap:
            if stuck:
                release.wait(WAIT)  # ignores its timeout, and keeps its thread
            return "done"

    live.start_worker(threads=2)
    try:
        first = capped.enqueue(True)
        until(lambda: first.status() == "running", "the first attempt runs")
        second = capped.enqueue(False)
        worker = live.worker
        assert worker is not None
        until(lambda: worker.overdue(), "the first attempt is past its timeout")
        [slots] = live.flow_state()["concurrency"]
        assert slots["in_use"] == 1  # still the overdue attempt's
        assert live.run_until_idle() == 0  # nobody else may start a capped job now
        assert second.status() == "queued"
        release.set()
        assert second.result(timeout=WAIT) == "done"
        assert live.get_job(first.id).status == "failed"
    finally:
        release.set()
        live.stop_worker(timeout=5)
    assert overlap.peak == 1


def test_a_step_of_a_timed_out_attempt_is_kept_and_never_run_again(live: Reliable) -> None:
    release = threading.Event()
    calls = {"slow": 0, "after": 0}

    def slow() -> str:
        calls["slow"] += 1
        release.wait(WAIT)  # ignores the attempt's timeout
        return "fetched"

    def after(value: str) -> str:
        calls["after"] += 1
        return value.upper()

    @live.task(timeout=0.3, retries=2, backoff=tenacity.wait_fixed(0))
    def job() -> str:
        value = step("slow", slow)
        return step("after", after, value)

    live.start_worker(threads=1)
    try:
        handle = job.enqueue()
        worker = live.worker
        assert worker is not None
        until(lambda: worker.overdue(), "the attempt is past its timeout")
        release.set()
        assert handle.result(timeout=WAIT) == "FETCHED"
    finally:
        release.set()
        live.stop_worker(timeout=5)
    # The first attempt finished its step, stopped at the boundary after it, and the
    # retry took the stored result.
    assert calls == {"slow": 1, "after": 1}
    assert live.get_job(handle.id).attempts == 2
    assert [s.name for s in live.get_steps(handle.id)] == ["slow", "after"]


def test_cancel_stops_a_running_job_at_its_next_step_and_keeps_the_current_one(
    live: Reliable,
) -> None:
    inside = threading.Event()
    release = threading.Event()
    ran: list[str] = []
    overlap = Overlap()

    def current() -> str:
        inside.set()
        release.wait(WAIT)
        ran.append("current")
        return "kept"

    @live.task(concurrency=1, retries=3)
    def long(n: int) -> None:
        with overlap:
            if n == 0:
                step("current", current)
                step("next", ran.append, "next")

    live.start_worker(threads=2)
    try:
        handle = long.enqueue(0)
        assert inside.wait(WAIT)
        other = long.enqueue(1)
        assert live.cancel(handle.id) is True
        assert handle.status() == "cancelled"
        assert live.run_until_idle() == 0  # its slot stays with the running attempt
        release.set()
        other.result(timeout=WAIT)
    finally:
        release.set()
        live.stop_worker(timeout=5)
    info = live.get_job(handle.id)
    assert (info.status, info.attempts) == ("cancelled", 1)
    assert ran == ["current"]  # the step in progress finished; nothing after it ran
    assert [(s.name, s.result) for s in live.get_steps(handle.id)] == [("current", "kept")]
    assert overlap.peak == 1


def test_a_job_cancelled_while_it_waits_in_the_worker_never_starts(
    db_url: str, live: Reliable
) -> None:
    started: list[int] = []
    release = threading.Event()

    @live.task
    def job(n: int) -> None:
        started.append(n)
        if n == -1:
            release.wait(WAIT)

    live.start_worker(threads=1)
    try:
        # Short jobs make the worker claim ahead of its one thread.
        for handle in [job.enqueue(n) for n in range(-40, -1)]:
            handle.result(timeout=WAIT)
        blocker = job.enqueue(-1)
        until(lambda: -1 in started, "the blocker runs")
        here, elsewhere = job.enqueue(1), job.enqueue(2)
        until(
            lambda: here.status() == elsewhere.status() == "running",
            "both are claimed ahead, waiting for the thread",
        )
        assert live.cancel(here.id)  # a cancel made in the worker's process
        other = Reliable(db_url, embedded_worker=False)  # and one made in another
        try:
            assert other.cancel(elsewhere.id)
        finally:
            other.close()

        def given_back() -> bool:
            rows = [live.store.get_job(h.id) for h in (here, elsewhere)]
            return all(row is not None and row.lease_owner is None for row in rows)

        until(given_back, "the worker dropped both")
        release.set()
        blocker.result(timeout=WAIT)
    finally:
        release.set()
        live.stop_worker(timeout=5)
    assert 1 not in started and 2 not in started
    for handle in (here, elsewhere):
        info = live.get_job(handle.id)
        assert (info.status, info.attempts) == ("cancelled", 0)


def test_stop_lets_short_attempts_finish_and_gives_back_what_was_claimed_ahead(
    live: Reliable,
) -> None:
    started = threading.Event()
    release = threading.Event()

    @live.task
    def job(n: int) -> int:
        if n == 0:
            started.set()
            release.wait(WAIT)
        return n

    first = job.enqueue(0)
    live.start_worker(threads=1)
    assert started.wait(WAIT)
    threading.Timer(0.05, release.set).start()
    live.stop_worker(timeout=WAIT)  # the running attempt finishes within the grace
    assert first.result(timeout=1) == 0
    assert live.get_job(first.id).attempts == 1


def test_an_attempt_that_outlives_the_stop_keeps_its_job_and_is_given_back_at_its_step(
    live: Reliable,
) -> None:
    inside = threading.Event()
    release = threading.Event()
    calls: list[str] = []
    overlap = Overlap()

    def waiting() -> None:
        inside.set()
        release.wait(WAIT)
        calls.append("waiting")

    @live.task
    def long() -> str:
        with overlap:
            step("waiting", waiting)
            step("rest", calls.append, "rest")
        return "finished"

    handle = long.enqueue()
    live.start_worker(threads=1)
    assert inside.wait(WAIT)
    live.stop_worker(timeout=0.2)  # returns after the grace period
    # The attempt still runs: its job is still its own, nobody else may start it.
    assert handle.status() == "running"
    assert live.run_until_idle() == 0
    release.set()
    # It stops at its next step boundary and gives the job back, uncounted.
    until(lambda: handle.status() == "queued", "the job is given back")
    assert live.get_job(handle.id).attempts == 0
    live.start_worker(threads=1)
    try:
        assert handle.result(timeout=WAIT) == "finished"
    finally:
        live.stop_worker(timeout=5)
    assert calls == ["waiting", "rest"]  # the kept step did not run again
    assert overlap.peak == 1
