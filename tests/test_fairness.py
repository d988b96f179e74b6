"""No head-of-line blocking: a saturated key's backlog does not delay other keys."""

from __future__ import annotations

import json
import threading
import time
import uuid

from sqlalchemy import func, select

from reliable import Reliable
from reliable.limits import Concurrency, plan
from reliable.store.schema import jobs

BACKLOG = 10_000


def parked(rel: Reliable) -> int:
    with rel.store.engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).where(jobs.c.blocked_on.is_not(None))
            ).scalar_one()
        )


def test_a_job_of_another_key_starts_at_once_behind_a_saturated_backlog(db_url: str) -> None:
    rel = Reliable(db_url, embedded_worker=False, sqlite_synchronous="NORMAL", poll_interval=5)
    release = threading.Event()
    started: dict[str, float] = {}

    @rel.task(concurrency=Concurrency(1, key="arg:tenant"))
    def sync(tenant: str, n: int) -> None:
        started.setdefault(tenant, time.monotonic())
        if tenant == "busy":
            release.wait(30)

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
        deadline = time.monotonic() + 30
        while "busy" not in started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "busy" in started, "the backlog's first job never started"
        # Let the worker find the key saturated: it parks the backlog off the claim path
        # (all but the few jobs it holds, waiting for the slot, and its next candidates).
        while parked(rel) < BACKLOG - 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert parked(rel) >= BACKLOG - 64, "the saturated backlog was not parked"
        enqueued = time.monotonic()
        quiet = sync.enqueue("quiet", 0)
        quiet.result(timeout=10)
        delay = started["quiet"] - enqueued
    finally:
        release.set()
        rel.stop_worker(timeout=5)
        rel.close()
    print(f"other key started {delay * 1000:.1f} ms after enqueue")
    assert delay < 0.5, f"another key waited {delay:.3f}s behind the saturated backlog"
