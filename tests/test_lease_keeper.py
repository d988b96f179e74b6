"""Leases are renewed on a timer of their own: a worker whose claims wait for the database
does not lose the jobs it is running."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from reliable import Reliable, current_job

WAIT = 20.0
LEASE = 1.5


@pytest.fixture
def live(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False, lease_seconds=LEASE, poll_interval=0.1)
    yield app
    app.close()


def lease_of(rel: Reliable, job_id: str) -> float:
    row = rel.store.get_job(job_id)
    assert row is not None and row.lease_expires_at is not None
    return row.lease_expires_at


def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_a_running_job_keeps_its_lease_while_the_worker_waits_for_a_lock(
    db_url: str, live: Reliable
) -> None:
    started, done = threading.Event(), threading.Event()
    locked = threading.Event()
    holder: list[object] = []

    @live.task
    def long() -> str:
        started.set()
        done.wait(WAIT)
        return "long"

    @live.task
    def short() -> str:
        if live.store.dialect == "postgresql":
            # Lock this job's own row in another transaction: settling this attempt
            # makes the worker's dispatcher wait for it.
            connection = live.store.engine.connect()
            connection.begin()
            connection.execute(
                text("SELECT id FROM reliable_jobs WHERE id = :id FOR UPDATE"),
                {"id": current_job().id},
            )
            holder.append(connection)
        locked.set()
        return "short"

    other = Reliable(db_url, embedded_worker=False)  # another worker's recovery
    live.start_worker(threads=2)
    try:
        first = long.enqueue()
        assert started.wait(WAIT)
        expiry = lease_of(live, first.id)
        blocker = None
        if live.store.dialect == "sqlite":
            # One lock for every writer: the worker's claims and renewals wait alike.
            blocker = sqlite3.connect(str(make_url(db_url).database), timeout=WAIT)
            blocker.execute("BEGIN IMMEDIATE")
        else:
            second = short.enqueue()
            assert locked.wait(WAIT)
            until(lambda: second.status() == "running" and locked.is_set(), "short ran")
        # Past the moment the lease would have run out without a renewal.
        until(lambda: time.time() > expiry + 0.2, "the old lease is over")
        released_at = time.time()
        if blocker is not None:
            blocker.rollback()
            blocker.close()
        until(lambda: lease_of(live, first.id) > expiry, "the lease is renewed")
        assert other.store.recover_expired(time.time()) == []
        if blocker is not None:  # renewed from when it could be written, not before
            assert lease_of(live, first.id) >= released_at + LEASE - 0.05
        for connection in holder:
            connection.rollback()  # type: ignore[attr-defined]
        done.set()
        assert first.result(timeout=WAIT) == "long"
    finally:
        done.set()
        for connection in holder:
            connection.close()  # type: ignore[attr-defined]
        live.stop_worker(timeout=5)
        other.close()
    assert live.get_job(first.id).attempts == 1
    assert live.get_attempts(first.id) == []  # never lost, never taken over


def test_a_worker_is_listed_alive_before_it_claims_anything(live: Reliable) -> None:
    # Its first heartbeat is written by start() itself: a job it runs at once never
    # comes before the worker that ran it in the workers table (metrics, dashboard).
    worker = live.start_worker(threads=1)
    try:
        listed = {w.id: w for w in live.store.list_workers()}
        assert worker.id in listed
        assert listed[worker.id].threads == 1
    finally:
        live.stop_worker(timeout=5)
