"""Real worker processes: kill -9 takeover, racing idempotent enqueues, SIGTERM release.

The workers run ``reliable worker tests.apps.worker_app:rel`` as separate processes; this
process only enqueues (knowing the tasks by name, as a web process would) and reads the
database.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import text

from reliable import JobTimeout, Reliable, Task

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.worker_app:rel"
LEASE_SECONDS = 2.0


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, logs: Callable[[], str]
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{logs()}")
        time.sleep(0.02)


class LineReader:
    """Lines a child prints, read by a thread so that waiting for one has a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float, logs: Callable[[], str]) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line from a producer within {timeout:g}s\n{logs()}")


class Processes:
    """Child processes of one test, their stderr kept in files; all killed at the end."""

    def __init__(self, directory: Path, database_url: str) -> None:
        self.directory = directory
        self.database_url = database_url
        self.started: list[subprocess.Popen[str]] = []
        self.readers: list[LineReader] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_")}
        env.update(
            RELIABLE_DATABASE_URL=self.database_url,
            RELIABLE_LEASE_SECONDS=str(LEASE_SECONDS),
            RELIABLE_POLL_INTERVAL="0.2",
            **extra,
        )
        return env

    def start(
        self, args: list[str], *, stdin: int | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        log = (self.directory / f"process-{len(self.started)}.log").open("w")
        with log:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                env=self.env(**(env or {})),
                stdin=stdin,
                stdout=subprocess.PIPE if stdin is not None else log,
                stderr=log,
                text=True,
            )
        self.started.append(process)
        return process

    def producer(self) -> tuple[subprocess.Popen[str], LineReader]:
        """The test application run as a producer: keys in on stdin, jobs out on stdout."""
        process = self.start(["-m", "tests.apps.worker_app"], stdin=subprocess.PIPE)
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        self.readers.append(reader)
        return process, reader

    def worker(self, *options: str, **env: str) -> subprocess.Popen[str]:
        """``reliable worker`` on the test application."""
        return self.start(["-m", "reliable.cli", "worker", APP, *options], env=env)

    def logs(self) -> str:
        parts = []
        for index, process in enumerate(self.started):
            tail = (self.directory / f"process-{index}.log").read_text()[-3000:]
            parts.append(f"--- process {process.pid} (exit {process.poll()}):\n{tail}")
        return "\n".join(parts)

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            if process.stdin is not None:
                process.stdin.close()
        for reader in self.readers:
            reader.thread.join(timeout=10)  # it closes the stream at end of file


@pytest.fixture
def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
    started = Processes(tmp_path, db_url)
    try:
        yield started
    finally:
        started.close()


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


def query(app: Reliable, sql: str, **params: Any) -> list[Any]:
    with app.store.engine.connect() as connection:
        rows = list(connection.execute(text(sql), params))
        connection.rollback()
    return rows


def side_effects(app: Reliable) -> dict[str, tuple[int, int]]:
    """Job id -> (n, pid) of every side effect so far (none before a task made the table)."""
    with app.store.engine.connect() as connection:
        rows = []
        if app.store.engine.dialect.has_table(connection, "side_effects"):
            rows = list(connection.execute(text("SELECT job_id, n, pid FROM side_effects")))
        connection.rollback()
    return {row.job_id: (row.n, row.pid) for row in rows}


def leases_of(app: Reliable, pid: int) -> list[str]:
    """Ids of the jobs a worker process with ``pid`` is running (its id holds the pid)."""
    rows = query(
        app,
        "SELECT id FROM reliable_jobs WHERE status = 'running' AND lease_owner LIKE :owner",
        owner=f"%:{pid}:%",
    )
    return [row.id for row in rows]


def jobs_table(app: Reliable) -> str:
    """The jobs, for a failure message."""
    rows = query(
        app,
        "SELECT id, status, attempts, lease_owner, lease_expires_at, run_at FROM reliable_jobs "
        "ORDER BY created_at",
    )
    now = time.time()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    lines = [f"jobs at {now:.3f}: {counts}"]
    lines += [
        f"{r.id} {r.status} attempts={r.attempts} owner={r.lease_owner} "
        f"expires_in={None if r.lease_expires_at is None else round(r.lease_expires_at - now, 2)}"
        f" due_in={r.run_at - now:.2f}"
        for r in rows
        if r.status != "succeeded"
    ]
    return "\n".join(lines)


def registered_pids(app: Reliable) -> set[int]:
    return {row.pid for row in query(app, "SELECT pid FROM reliable_workers")}


def task(app: Reliable, name: str) -> Task[Any, Any]:
    return app.tasks[name]


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
    one that does not, and exits 0 promptly; the next worker runs the released job, whose
    released attempt is not counted (``attempts == 1``, no attempt recorded)."""
    long_job = task(client, "slow").enqueue(1)
    gate = tmp_path / "gate"
    short_job = task(client, "gated").enqueue(2, gate=str(gate))
    markers = tmp_path / "markers"
    markers.mkdir()
    first = processes.worker(
        "--threads",
        "2",
        "--grace",
        "0.5",
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
    try:
        exit_code = first.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not exit within 10s of SIGTERM\n{processes.logs()}")
    took = time.time() - signalled
    assert exit_code == 0, processes.logs()
    assert took < 5.0, f"exit took {took:.2f}s after SIGTERM (grace 0.5s)\n{processes.logs()}"

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
