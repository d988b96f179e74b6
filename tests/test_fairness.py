"""No head-of-line blocking: a saturated key's backlog does not delay other keys."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from sqlalchemy import func, select

from reliable import JobTimeout, Reliable
from reliable.limits import Concurrency, plan
from reliable.store.schema import jobs

BACKLOG = 10_000
POLL_SECONDS = 60.0  # longer than the test waits: a job that starts was woken for


def parked(rel: Reliable) -> int:
    with rel.store.engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).where(jobs.c.blocked_on.is_not(None))
            ).scalar_one()
        )


def test_a_job_of_another_key_starts_at_once_behind_a_saturated_backlog(db_url: str) -> None:
    """While one job of a key of ``concurrency=1`` holds its slot, with 10,000 jobs of
    that key queued behind it, a job of another key still starts, and it starts on the
    enqueue's wake-up: the poll interval is a minute, so only a wake-up can start it
    within the 20 s the test waits, and only a claim that does not stop at the
    saturated backlog can find it."""
    rel = Reliable(
        db_url, embedded_worker=False, sqlite_synchronous="NORMAL", poll_interval=POLL_SECONDS
    )
    busy_started, busy_running, release = threading.Event(), threading.Event(), threading.Event()
    busy_runs: list[int] = []
    seen_by_quiet: dict[str, object] = {}

    @rel.task(concurrency=Concurrency(1, key="arg:tenant"))
    def sync(tenant: str, n: int) -> None:
        if tenant == "busy":
            busy_runs.append(n)
            busy_running.set()
            busy_started.set()
            try:
                release.wait(POLL_SECONDS)
            finally:
                busy_running.clear()
        else:
            seen_by_quiet.update(busy_holding=busy_running.is_set(), busy_runs=len(busy_runs))

    # The backlog, written in bulk: 10,000 jobs of one key, older than anything else.
    flow = plan("sync", sync.options.flow, lambda key, option: "busy")
    assert flow.limits is not None and json.loads(flow.limits)["concurrency"]
    now = rel.clock.now() - 60
    ids = [uuid.uuid4().hex for _ in range(BACKLOG)]
    with rel.store.engine.begin() as connection:
        connection.execute(
            jobs.insert(),
            [
                {
                    "id": job_id,
                    "task": "sync",
                    "queue": "default",
                    "priority": 0,
                    "status": "queued",
                    "payload": json.dumps({"args": ["busy", n], "kwargs": {}}),
                    "attempts": 0,
                    "run_at": now + n * 1e-4,
                    "created_at": now,
                    "limits": flow.limits,
                }
                for n, job_id in enumerate(ids)
            ],
        )

    rel.start_worker(threads=4)
    try:
        assert busy_started.wait(30), "the backlog's first job never started"
        assert rel.worker is not None
        deadline = time.monotonic() + 30
        # Let the worker find the key saturated: it parks the backlog off the claim path
        # (all but the few jobs it holds, waiting for the slot, and its next candidates).
        # A claim round after the slot was taken does that; with polls a minute apart,
        # the test asks for the rounds.
        while parked(rel) < BACKLOG - 64 and time.monotonic() < deadline:
            rel.worker.wake()
            time.sleep(0.05)
        assert parked(rel) >= BACKLOG - 64, "the saturated backlog was not parked"
        quiet = sync.enqueue("quiet", 0)
        try:
            quiet.result(timeout=20)
        except JobTimeout:
            pytest.fail("another key's job was not started behind the saturated backlog")
    finally:
        release.set()
        rel.stop_worker(timeout=5)
        rel.close()
    # It ran while the backlog's first job still held the key's only slot, and before
    # any other job of the backlog had run.
    assert seen_by_quiet == {"busy_holding": True, "busy_runs": 1}
