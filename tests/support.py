"""Machinery for tests that run real processes: children with logs, deadlines, DB reads.

Test modules import it as ``support`` (pytest puts ``tests/`` on ``sys.path``). A
module binds its own application and fixture::

    @pytest.fixture
    def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
        with Processes(tmp_path, db_url, app="tests.apps.worker_app:rel") as started:
            yield started

Children run from the repository root, so ``tests.apps.*`` modules import there.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pytest
from sqlalchemy import text

from reliable import Reliable, Task
from reliable.store import JobRow

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    """Child processes of one test, their stderr kept in files; all killed at the end.

    ``app`` is the ``module:attribute`` that workers load; its module, run with
    ``python -m``, is the producer. Every child gets ``RELIABLE_DATABASE_URL``, a short
    lease (``lease_seconds``) and a short poll interval; ``env=`` adds or overrides.
    """

    def __init__(
        self,
        directory: Path,
        database_url: str,
        *,
        app: str,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.directory = directory
        self.database_url = database_url
        self.app = app
        self.lease_seconds = lease_seconds
        self.started: list[subprocess.Popen[str]] = []
        self.readers: list[LineReader] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_")}
        env.update(
            RELIABLE_DATABASE_URL=self.database_url,
            RELIABLE_LEASE_SECONDS=str(self.lease_seconds),
            RELIABLE_POLL_INTERVAL="0.2",
        )
        env.update(extra)
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

    def producer(self, *args: str, **env: str) -> tuple[subprocess.Popen[str], LineReader]:
        """The application's module run as a producer: commands in on stdin, replies out
        on stdout (read with the returned ``LineReader``)."""
        module = self.app.partition(":")[0]
        process = self.start(["-m", module, *args], stdin=subprocess.PIPE, env=env)
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        self.readers.append(reader)
        return process, reader

    def worker(self, *options: str, **env: str) -> subprocess.Popen[str]:
        """``reliable worker`` on the application."""
        return self.start(["-m", "reliable.cli", "worker", self.app, *options], env=env)

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


def query(app: Reliable, sql: str, **params: Any) -> list[Any]:
    """Rows of a read-only ``sql`` on the application's database."""
    with app.store.engine.connect() as connection:
        rows = list(connection.execute(text(sql), params))
        connection.rollback()
    return rows


def has_table(app: Reliable, name: str) -> bool:
    """Whether a table exists yet (tables of test applications appear when one starts)."""
    with app.store.engine.connect() as connection:
        found = app.store.engine.dialect.has_table(connection, name)
        connection.rollback()
    return bool(found)


def drop_table(app: Reliable, name: str) -> None:
    with app.store.engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


def count_jobs(app: Reliable, status: str | None = None) -> int:
    """How many jobs there are (with ``status``, if given)."""
    if status is None:
        return int(query(app, "SELECT count(*) AS n FROM reliable_jobs")[0].n)
    sql = "SELECT count(*) AS n FROM reliable_jobs WHERE status = :status"
    return int(query(app, sql, status=status)[0].n)


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
    """Process ids of the workers that have announced themselves (heartbeat)."""
    return {row.pid for row in query(app, "SELECT pid FROM reliable_workers")}


def task(app: Reliable, name: str) -> Task[Any, Any]:
    return app.tasks[name]


def start_workers(
    processes: Processes, client: Reliable, count: int, *, threads: int = 4, **env: str
) -> list[subprocess.Popen[str]]:
    """``count`` workers of ``threads`` threads, once they have all announced themselves."""
    workers = [processes.worker("--threads", str(threads), **env) for _ in range(count)]
    pids = {worker.pid for worker in workers}
    wait_until(lambda: pids <= registered_pids(client), 30, "the workers to start", processes.logs)
    return workers


def wait_for_status(
    client: Reliable, processes: Processes, job_id: str, status: str, timeout: float = 30
) -> None:
    """Wait until the job is in ``status``; fail with the jobs and the logs after ``timeout``."""
    wait_until(
        lambda: client.store.get_status(job_id) == status,
        timeout,
        f"job {job_id} to be {status}",
        lambda: f"{jobs_table(client)}\n{processes.logs()}",
    )


def watch_unfinished_reads(rel: Reliable, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set once the store reads a job unfinished from now on: a status request
    with ``?wait=`` that got that far waits for the job to end."""
    seen = threading.Event()
    store = rel.store
    get_job = store.get_job

    def spy(job_id: str) -> JobRow | None:
        row = get_job(job_id)
        if row is not None and row.status not in ("succeeded", "failed", "cancelled"):
            seen.set()
        return row

    monkeypatch.setattr(store, "get_job", spy)
    return seen
