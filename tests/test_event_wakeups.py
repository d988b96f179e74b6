"""An event is never lost: not when it races with the attempt parking on its wait, and a
sleeping job left waiting for nothing is repaired by the workers' sweep."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import text

from reliable import ManualClock, Reliable, wait_for_event
from reliable.execution import run_attempt
from reliable.serialization import dumps
from reliable.store import steps as stored_steps

WAIT = 20.0


def waits_for_a_lock(rel: Reliable) -> bool:
    """Whether another session of this PostgreSQL database waits for a row lock."""
    with rel.store.engine.connect() as connection:
        waiting = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        ).scalar()
    return bool(waiting)


def test_an_event_sent_while_the_attempt_parks_wakes_the_job(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def approve() -> object:
        return wait_for_event("approval", "approved")

    handle = approve.enqueue()
    job = rel.store.claim("worker-a", ["default"], 1, clock.now(), 30).jobs[0]
    parked = run_attempt(rel, job)  # the wait is stored; the attempt has not settled yet
    assert parked.status == "sleeping"

    settled = threading.Event()

    def settle() -> None:
        rel.store.settle("worker-a", [parked])
        settled.set()

    # The event is delivered in a transaction that is still open while the attempt
    # settles: whichever commits second must see the other.
    with rel.store.engine.begin() as connection:
        woken = stored_steps.deliver(
            connection, None, uuid.uuid4().hex, "approved", dumps({"ok": True}), clock.now()
        )
        assert woken == [handle.id]
        settler = threading.Thread(target=settle)
        settler.start()
        if rel.store.dialect == "postgresql":  # SQLite: the settle waits for the write lock
            deadline = time.monotonic() + WAIT
            while not (settled.is_set() or waits_for_a_lock(rel)):
                assert time.monotonic() < deadline, "the settle neither waited nor finished"
                time.sleep(0.01)
    settler.join(WAIT)
    assert settled.is_set()
    assert rel.run_until_idle() == 1  # due now, not in 9999
    assert handle.result(timeout=1) == {"ok": True}


def test_a_sleeping_job_waiting_for_nothing_is_woken_by_the_sweep(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def approve() -> object:
        return wait_for_event("approval", "approved")

    handle = approve.enqueue()
    assert rel.run_until_idle() == 1
    assert handle.status() == "sleeping"
    # What a lost wake-up leaves behind: the wait completed, the job still parked.
    with rel.store.engine.begin() as connection:
        stored_steps.complete_wait(connection, handle.id, "approval", dumps("yes"), clock.now())
    assert rel.run_until_idle() == 0
    assert rel.store.wake_orphaned_sleepers(clock.now()) == 1
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=1) == "yes"


def test_the_sweep_leaves_jobs_that_really_wait_alone(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def approve() -> object:
        return wait_for_event("approval", "approved", timeout="1h")

    @rel.task
    def nap() -> None:
        from reliable import sleep

        sleep("nap", "1h")

    waiting, napping = approve.enqueue(), nap.enqueue()
    assert rel.run_until_idle() == 2
    assert rel.store.wake_orphaned_sleepers(clock.now()) == 0
    assert waiting.status() == napping.status() == "sleeping"
