"""``JobHandle.result()`` that times out says when no worker could have run the job."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from reliable import JobTimeout, ManualClock, Reliable

WAIT = 30.0  # bounds a hang only


@pytest.fixture
def other_process(db_url: str, clock: ManualClock) -> Iterator[Reliable]:
    """A second application on the same database: to this test, another process."""
    other = Reliable(db_url, clock=clock, embedded_worker=False)
    yield other
    other.close()


def enqueue_one(rel: Reliable) -> str:
    @rel.task(queue="reports")
    def report(day: int) -> int:
        return day

    return report.enqueue(1).id


def timeout_message(rel: Reliable, job_id: str) -> str:
    with pytest.raises(JobTimeout) as raised:
        rel.job(job_id).result(timeout=0.2)
    assert raised.value.job_id == job_id
    return str(raised.value)


def wait_for_heartbeat(rel: Reliable) -> None:
    deadline = time.monotonic() + WAIT
    while not rel.store.live_workers(rel.clock.now(), rel.settings.lease_seconds):
        assert time.monotonic() < deadline, "the worker never recorded its heartbeat"
        time.sleep(0.02)


def test_with_no_worker_anywhere_the_timeout_says_how_to_start_one(rel: Reliable) -> None:
    job_id = enqueue_one(rel)
    message = timeout_message(rel, job_id)
    assert message.startswith(f"job {job_id} did not finish within 0.2 s: ")
    assert "no worker runs in this process" in message
    assert f"for {rel.settings.lease_seconds:g} s" in message
    assert "rel.start_worker()" in message
    assert "reliable worker" in message
    assert rel.job(job_id).status() == "queued"


def test_a_worker_in_this_process_is_not_reported_missing(rel: Reliable) -> None:
    job_id = enqueue_one(rel)
    rel.start_worker(threads=1, queues=["elsewhere"])  # alive, but never takes the job
    message = timeout_message(rel, job_id)
    assert message == f"job {job_id} did not finish within 0.2 s"


def test_a_worker_alive_in_another_process_is_not_reported_missing(
    rel: Reliable, other_process: Reliable
) -> None:
    job_id = enqueue_one(rel)
    other_process.start_worker(threads=1, queues=["elsewhere"])
    wait_for_heartbeat(rel)
    message = timeout_message(rel, job_id)
    assert message == f"job {job_id} did not finish within 0.2 s"


@pytest.mark.parametrize(("age", "alive"), [(1.0, True), (-1.0, False)], ids=["fresh", "stale"])
def test_a_worker_counts_as_alive_while_its_heartbeat_is_younger_than_a_lease(
    rel: Reliable, clock: ManualClock, age: float, alive: bool
) -> None:
    """``age``: seconds before a lease has passed since the heartbeat (negative: after)."""
    job_id = enqueue_one(rel)
    lease = rel.settings.lease_seconds
    rel.store.heartbeat(
        "a-worker-elsewhere",
        [],
        lambda: clock.now() - lease + age,
        lease,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        queues=["reports"],
        threads=1,
        started_at=clock.now() - 600,
    )
    assert rel.store.live_workers(clock.now(), lease) == int(alive)
    message = timeout_message(rel, job_id)
    assert ("rel.start_worker()" in message) is not alive, message
