"""Leases: a dead worker's attempts are taken over; a late result is discarded (fencing)."""

from __future__ import annotations

import pytest

from reliable import ManualClock, Reliable
from reliable.execution import run_attempt


def test_expired_lease_is_taken_over_and_the_late_result_discarded(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def work(x: int) -> int:
        return x

    handle = work.enqueue(1)
    lease = rel.settings.lease_seconds
    first = rel.store.claim("worker-a", ["default"], 1, clock.now(), lease).jobs[0]
    assert handle.status() == "running"

    clock.advance(lease + 1)  # worker-a stopped renewing: it died, or froze
    assert rel.store.recover_expired(clock.now()) == [handle.id]
    second = rel.store.claim("worker-b", ["default"], 1, clock.now(), lease).jobs[0]
    assert second.attempt == first.attempt + 1

    # worker-a wakes up and reports; its result must not land.
    late = run_attempt(rel, first)
    assert rel.store.settle("worker-a", [late]) == [handle.id]
    assert handle.status() == "running"

    assert rel.store.settle("worker-b", [run_attempt(rel, second)]) == []
    info = rel.get_job(handle.id)
    assert (info.status, info.attempts, info.result) == ("succeeded", 2, 1)
    lost = rel.get_attempts(handle.id)
    assert [(a.attempt, a.outcome, a.worker_id) for a in lost] == [(1, "lost", "worker-a")]


def test_heartbeat_keeps_the_lease(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def work() -> None: ...

    handle = work.enqueue()
    lease = rel.settings.lease_seconds
    rel.store.claim("worker-a", ["default"], 1, clock.now(), lease)
    for _ in range(5):
        clock.advance(lease / 2)
        states = rel.store.heartbeat(
            "worker-a",
            [(handle.id, 1)],
            clock.now,
            lease,
            hostname="h",
            pid=1,
            queues=["default"],
            threads=1,
            started_at=0,
        )
        assert (states.lost, states.cancelled) == (frozenset(), frozenset())
        assert rel.store.recover_expired(clock.now()) == []
    assert handle.status() == "running"


def test_lost_attempts_count_against_retries(rel: Reliable, clock: ManualClock) -> None:
    failed = []

    @rel.task(retries=1, on_failure=failed.append)
    def crashes_its_worker() -> None: ...

    handle = crashes_its_worker.enqueue()
    lease = rel.settings.lease_seconds
    for worker in ("a", "b"):
        rel.store.claim(worker, ["default"], 1, clock.now(), lease)
        clock.advance(lease + 1)
        rel.store.recover_expired(clock.now())
    assert rel.run_until_idle() == 1  # claimed a third time: no attempts left, never run
    info = rel.get_job(handle.id)
    assert info.status == "failed"
    assert info.error is not None and "lost" in info.error["message"]
    assert [job.id for job in failed] == [handle.id]


def test_cancel_while_running_discards_the_result_and_does_not_retry(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(retries=3)
    def work() -> str:
        return "done"

    handle = work.enqueue()
    claimed = rel.store.claim("worker-a", ["default"], 1, clock.now(), 30).jobs[0]
    assert rel.cancel(handle.id) is True
    assert handle.status() == "cancelled"
    # The attempt ran to its end; what it returned does not land.
    rel.store.settle("worker-a", [run_attempt(rel, claimed)])
    assert rel.run_until_idle() == 0
    info = rel.get_job(handle.id)
    assert (info.status, info.result) == ("cancelled", None)
    row = rel.store.get_job(handle.id)
    assert row is not None and (row.lease_owner, row.slots_held) == (None, 0)


def test_a_cancelled_attempt_keeps_its_lease_until_it_ends_and_is_never_retried(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(retries=3)
    def work() -> str:
        return "done"

    handle = work.enqueue()
    claimed = rel.store.claim("worker-a", ["default"], 1, clock.now(), 30).jobs[0]
    assert rel.cancel(handle.id) is True
    states = rel.store.check_attempts("worker-a", [(claimed.id, claimed.attempt)])
    assert states.cancelled == {(claimed.id, claimed.attempt)} and not states.lost
    # Its worker died while the attempt wound down: the lease expires, the job stays
    # cancelled, and it is not run again.
    clock.advance(31)
    assert rel.store.recover_expired(clock.now()) == []
    assert rel.run_until_idle() == 0
    row = rel.store.get_job(handle.id)
    assert row is not None and (row.status, row.lease_owner) == ("cancelled", None)


def test_release_gives_the_job_back_without_counting_the_attempt(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def work() -> int:
        return 7

    handle = work.enqueue()
    claimed = rel.store.claim("worker-a", ["default"], 1, clock.now(), 30).jobs[0]
    assert rel.store.release("worker-a", [(claimed.id, claimed.attempt)], clock.now()) == 1
    assert handle.status() == "queued"
    rel.run_until_idle()
    assert rel.get_job(handle.id).attempts == 1
    assert handle.result(timeout=1) == 7


@pytest.mark.parametrize("limit", [1, 3])
def test_a_job_is_claimed_by_one_worker_only(rel: Reliable, clock: ManualClock, limit: int) -> None:
    @rel.task
    def work(i: int) -> None: ...

    for i in range(5):
        work.enqueue(i)
    seen: list[str] = []
    for worker in ("a", "b", "c", "d", "e"):
        claimed = rel.store.claim(worker, ["default"], limit, clock.now(), 30)
        seen += [job.id for job in claimed.jobs]
    assert len(seen) == len(set(seen)) == 5
