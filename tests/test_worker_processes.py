"""Real worker processes: kill -9 takeover, racing idempotent enqueues, SIGTERM release.

The workers run ``reliable worker tests.apps.worker_app:rel`` as separate processes; this
process only enqueues (knowing the tasks by name, as a web process would) and reads the
database.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from support import (
    Processes,
    jobs_table,
    leases_of,
    query,
    registered_pids,
    task,
    wait_until,
)

from reliable import JobTimeout, Reliable

APP = "tests.apps.worker_app:rel"
GRACE_SECONDS = 5.0  # ample for a job that ends at SIGTERM, far short of the default 30 s


@pytest.fixture
def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
    with Processes(tmp_path, db_url, app=APP) as started:
        yield started


@pytest.fixture
def client(db_url: str) -> Iterator[Reliable]:
    """The producer side: the worker app's tasks by name, and a view of the database."""
    app = Reliable(db_url, embedded_worker=False)

    @app.task(name="record")
    def record(n: int, seconds: float = 0.0) -> int:
        raise AssertionError("runs in the worker processes")

    @app.task(name="gated")
    def gated(n: int, gate: str) -> int:
        raise AssertionError("runs in the worker processes")

    @app.task(name="slow")
    def slow(n: int) -> int:
        raise AssertionError("runs in the worker processes")

    drop_side_effects(app)
    yield app
    drop_side_effects(app)
    app.close()


def drop_side_effects(app: Reliable) -> None:
    with app.store.engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS side_effects"))


def side_effects(app: Reliable) -> dict[str, tuple[int, int]]:
    """Job id -> (n, pid) of every side effect so far (none before a task made the table)."""
    with app.store.engine.connect() as connection:
        rows = []
        if app.store.engine.dialect.has_table(connection, "side_effects"):
            rows = list(connection.execute(text("SELECT job_id, n, pid FROM side_effects")))
        connection.rollback()
    return {row.job_id: (row.n, row.pid) for row in rows}


@pytest.mark.slow
def test_a_killed_worker_s_jobs_are_taken_over_and_every_job_succeeds(
    client: Reliable, processes: Processes
) -> None:
    """kill -9 of a busy worker loses no job: its leases expire, the other worker reruns
    them (recorded as ``lost`` attempts), and every job's side effect exists exactly once."""
    victim = processes.worker("--threads", "4")
    survivor = processes.worker("--threads", "4")
    wait_until(
        lambda: {victim.pid, survivor.pid} <= registered_pids(client),
        20,
        "both workers to start",
        processes.logs,
    )

    record = task(client, "record")
    handles = [record.enqueue(n, seconds=0.25) for n in range(60)]
    wait_until(
        lambda: len(side_effects(client)) >= 8 and len(leases_of(client, victim.pid)) > 0,
        20,
        "progress while the victim holds leases",
        processes.logs,
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    orphaned = leases_of(client, victim.pid)
    assert orphaned, "the victim held no lease when it died; nothing was taken over"

    ids = [handle.id for handle in handles]
    finished = "SELECT count(*) AS n FROM reliable_jobs WHERE status = 'succeeded'"
    wait_until(
        lambda: query(client, finished)[0].n == len(ids),
        30,
        "all jobs to succeed",
        lambda: f"{jobs_table(client)}\n{processes.logs()}",
    )
    assert survivor.poll() is None, processes.logs()

    effects = side_effects(client)
    assert sorted(effects) == sorted(ids)
    for n, handle in enumerate(handles):
        info = client.get_job(handle.id)
        assert (info.status, info.result, effects[handle.id][0]) == ("succeeded", n, n)
        # Every attempt is accounted for: those that did not succeed are recorded.
        assert info.attempts == len(client.get_attempts(handle.id)) + 1
    for job_id in orphaned:
        first = client.get_attempts(job_id)[0]
        assert (first.attempt, first.outcome) == (1, "lost")
        assert first.worker_id is not None and f":{victim.pid}:" in first.worker_id


@pytest.mark.slow
def test_one_idempotency_key_enqueued_by_four_processes_at_once_makes_one_job(
    client: Reliable, processes: Processes
) -> None:
    """Four processes enqueueing with one key at the same instant get one job, the same id
    for all, and exactly one of them is told it created it (five rounds)."""
    producers, readers = zip(*(processes.producer() for _ in range(4)), strict=True)
    for reader in readers:
        assert reader.next(20, processes.logs) == "ready"

    for round_ in range(5):
        key = f"race-{round_}"
        for producer in producers:  # released together: each is blocked reading stdin
            assert producer.stdin is not None
            producer.stdin.write(f"{key}\n")
            producer.stdin.flush()
        replies = [json.loads(reader.next(10, processes.logs)) for reader in readers]
        assert {reply["key"] for reply in replies} == {key}
        assert len({reply["id"] for reply in replies}) == 1, replies
        created = sorted(reply["created"] for reply in replies)
        assert created == [False, False, False, True], replies
        rows = query(client, "SELECT id FROM reliable_jobs WHERE idempotency_key = :k", k=key)
        assert [row.id for row in rows] == [replies[0]["id"]]

    for producer in producers:
        assert producer.stdin is not None
        producer.stdin.close()
    for producer in producers:
        assert producer.wait(timeout=10) == 0, processes.logs()
    assert query(client, "SELECT count(*) AS n FROM reliable_jobs")[0].n == 5


@pytest.mark.slow
def test_sigterm_finishes_short_attempts_and_releases_long_ones_uncounted(
    client: Reliable, processes: Processes, tmp_path: Path
) -> None:
    """On SIGTERM a worker finishes the attempt that fits in its grace period, releases the
    one that does not, and exits 0 once its grace period is over; the next worker runs the
    released job, whose released attempt is not counted (``attempts == 1``, no attempt
    recorded)."""
    long_job = task(client, "slow").enqueue(1)
    gate = tmp_path / "gate"
    short_job = task(client, "gated").enqueue(2, gate=str(gate))
    markers = tmp_path / "markers"
    markers.mkdir()
    first = processes.worker(
        "--threads",
        "2",
        "--grace",
        str(GRACE_SECONDS),
        WORKER_APP_SLOW_SECONDS="60",
        WORKER_APP_MARKERS=str(markers),
    )
    wait_until(
        lambda: all((markers / f"{job.id}.started").exists() for job in (long_job, short_job)),
        20,
        "both jobs to start",
        processes.logs,
    )
    assert sorted(leases_of(client, first.pid)) == sorted([long_job.id, short_job.id])

    signalled = time.time()
    first.send_signal(signal.SIGTERM)
    gate.touch()  # the short job ends now, well within the grace period
    # Exiting within 20 s means the worker kept to its grace period: waiting for the long
    # attempt would take 60 s, and the default grace period is 30 s.
    try:
        exit_code = first.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within 20s of SIGTERM\n{processes.logs()}")
    assert exit_code == 0, processes.logs()

    short = client.get_job(short_job.id)
    assert short.status == "succeeded", processes.logs()
    assert short.finished_at is not None and short.finished_at.timestamp() > signalled
    assert side_effects(client)[short_job.id] == (2, first.pid)
    # Released, not left to expire: queued at once (the lease has 2 s to run), uncounted.
    released = client.get_job(long_job.id)
    assert (released.status, released.attempts) == ("queued", 0)
    assert client.get_attempts(long_job.id) == []
    assert long_job.id not in side_effects(client)

    second = processes.worker("--threads", "1", WORKER_APP_SLOW_SECONDS="0.1")
    try:
        long_job.wait(timeout=20)
    except JobTimeout:
        pytest.fail(f"the released job did not finish\n{processes.logs()}")
    done = client.get_job(long_job.id)
    assert (done.status, done.attempts, done.result) == ("succeeded", 1, 1)
    assert client.get_attempts(long_job.id) == []
    assert side_effects(client)[long_job.id] == (1, second.pid)

    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=10) == 0, processes.logs()
