"""The embedded worker: threads in this process, graceful stop, timeouts that preempt."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import tenacity

from reliable import Reliable


@pytest.fixture
def live(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False, poll_interval=0.2, lease_seconds=5)
    yield app
    app.close()


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
        assert [h.result(timeout=20) for h in handles] == [n * 10 for n in range(20)]
    finally:
        live.stop_worker(timeout=5)
    assert all(live.get_job(h.id).attempts == 2 for h in handles)


def test_a_job_enqueued_while_idle_starts_at_once(live: Reliable) -> None:
    @live.task
    def stamp() -> float:
        return time.time()

    live.start_worker(threads=2)
    try:
        time.sleep(0.3)  # let the worker go idle
        enqueued = time.time()
        started = stamp.enqueue().result(timeout=10)
    finally:
        live.stop_worker(timeout=5)
    assert started - enqueued < 0.15  # woken, not polled (poll interval is 0.2 s)


def test_timeout_preempts_a_stuck_attempt_and_the_pool_keeps_working(live: Reliable) -> None:
    release = threading.Event()
    attempts: list[int] = []

    @live.task(timeout=0.3, retries=1, backoff=tenacity.wait_fixed(0))
    def stuck() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            release.wait(10)  # ignores its timeout
            return "late"
        return "second"

    @live.task
    def quick() -> str:
        return "quick"

    live.start_worker(threads=1)
    try:
        handle = stuck.enqueue()
        assert handle.result(timeout=10) == "second"
        assert quick.enqueue().result(timeout=10) == "quick"  # a thread replaced the stuck one
    finally:
        release.set()
        live.stop_worker(timeout=5)
    [lost] = live.get_attempts(handle.id)
    assert lost.error is not None and "timeout" in lost.error["message"]


def test_a_timed_out_attempt_gives_its_concurrency_slot_back_at_once(live: Reliable) -> None:
    release = threading.Event()

    @live.task(concurrency=1, timeout=0.3, retries=0)
    def capped(stuck: bool) -> str:
        if stuck:
            release.wait(10)  # ignores its timeout, and keeps its thread
        return "done"

    live.start_worker(threads=2)
    try:
        first = capped.enqueue(True)
        time.sleep(0.1)  # the stuck attempt holds the only slot
        second = capped.enqueue(False)
        # Well within the lease (5 s): the slot came back when the first timed out.
        assert second.result(timeout=3) == "done"
        assert live.get_job(first.id).status == "failed"
    finally:
        release.set()
        live.stop_worker(timeout=5)


def test_stop_lets_short_attempts_finish_and_releases_long_ones(live: Reliable) -> None:
    started = threading.Event()
    release = threading.Event()

    @live.task
    def long_job() -> str:
        started.set()
        release.wait(10)
        return "finished"

    handle = long_job.enqueue()
    live.start_worker(threads=1)
    assert started.wait(10)
    live.stop_worker(timeout=0.2)
    assert handle.status() == "queued"  # released, not lost, not failed
    assert live.get_job(handle.id).attempts == 0
    release.set()
    live.start_worker(threads=1)
    try:
        assert handle.result(timeout=10) == "finished"
    finally:
        live.stop_worker(timeout=5)
