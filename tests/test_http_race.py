"""Real servers: uvicorn processes of the example apps on one database.

The race (SPEC §9.4): three server processes and fifty concurrent requests carrying one
``Idempotency-Key`` make exactly one job, and every caller gets its 202. Then a
standalone ``reliable worker`` process runs what the servers accepted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reliable import Reliable

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
TIMEOUT = 30.0
MAX_PAYLOAD = 4096


class Processes:
    """Child processes of one test, output kept in files; all killed at the end."""

    def __init__(self, directory: Path, database_url: str) -> None:
        self.directory = directory
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_")}
        self.env.update(
            RELIABLE_DATABASE_URL=database_url,
            RELIABLE_EMBEDDED_WORKER="0",
            RELIABLE_MAX_PAYLOAD=str(MAX_PAYLOAD),
            RELIABLE_POLL_INTERVAL="0.2",
            DEMO_EMAIL_FAILURE_RATE="0",
        )
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.directory / f"process-{len(self.started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdout=out, stderr=out
            )
        self.started.append((process, log))
        return process, log

    def servers(self, app: str, count: int = 1) -> list[str]:
        """Start ``count`` uvicorn processes on free ports; their URLs once all serve."""
        started = [
            self.start("-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0")
            for _ in range(count)
        ]
        deadline = time.monotonic() + TIMEOUT
        urls = []
        for process, log in started:
            while (match := STARTED.search(log.read_text())) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"uvicorn did not start\n{self.logs()}")
                time.sleep(0.05)
            urls.append(f"http://127.0.0.1:{match.group(1)}")
        return urls

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.args} (exit {process.poll()}):\n{log.read_text()[-3000:]}"
            for process, log in self.started
        )

    def close(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.kill()
        for process, _ in self.started:
            process.wait(timeout=TIMEOUT)


@pytest.fixture
def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
    rel = Reliable(db_url)
    rel.store  # noqa: B018 - the schema exists before three servers open the database
    rel.close()
    children = Processes(tmp_path, db_url)
    try:
        yield children
    finally:
        children.close()


def count_jobs(db_url: str) -> int:
    rel = Reliable(db_url)
    try:
        return sum(rel.store.count_by_status().values())
    finally:
        rel.close()


def test_fifty_duplicates_across_three_servers_make_one_job(
    processes: Processes, db_url: str
) -> None:
    urls = processes.servers("examples.starlette_app:app", 3)
    callers = 50
    barrier = threading.Barrier(callers)
    answers: list[tuple[int, str | None, str | None]] = []

    client = httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_connections=callers))

    def refund(index: int) -> None:
        barrier.wait(TIMEOUT)
        response = client.post(
            f"{urls[index % len(urls)]}/orders/7/refunds",
            json={"amount_cents": 500},
            headers={"Idempotency-Key": "refund-7-race"},
        )
        job_id = response.json().get("id") if response.status_code == 202 else response.text
        answers.append((response.status_code, job_id, response.headers.get("idempotent-replayed")))

    threads = [threading.Thread(target=refund, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    client.close()

    assert len(answers) == callers, processes.logs()
    assert {status for status, _, _ in answers} == {202}, answers
    assert len({job_id for _, job_id, _ in answers}) == 1
    assert sum(replayed is None for _, _, replayed in answers) == 1
    assert count_jobs(db_url) == 1

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked, refused mid-way
        yield b'{"amount_cents": 500, "note": "'
        for _ in range(MAX_PAYLOAD // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    oversized = httpx.post(
        f"{urls[0]}/orders/8/refunds",
        content=chunks(),
        headers={"Idempotency-Key": "refund-8", "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert oversized.status_code == 413
    assert count_jobs(db_url) == 1


@pytest.mark.parametrize("module", ["examples.starlette_app", "examples.fastapi_app"])
def test_a_standalone_worker_runs_what_a_server_accepted(processes: Processes, module: str) -> None:
    processes.start("-m", "reliable.cli", "worker", f"{module}:rel", "--threads", "2")
    [url] = processes.servers(f"{module}:app")

    accepted = httpx.post(
        f"{url}/orders/42/receipt?template=short",
        json={"email": "ada@example.com"},
        headers={"X-Request-Id": "req-9"},
        timeout=TIMEOUT,
    )
    assert accepted.status_code == 202, accepted.text
    done = httpx.get(
        url + accepted.headers["location"], params={"wait": str(TIMEOUT)}, timeout=TIMEOUT + 5
    ).json()

    assert done["status"] == "succeeded", processes.logs()
    assert done["result"]["status_code"] == 201
    body = done["result"]["body"]
    assert (body["order_id"], body["email"], body["template"], body["request_id"]) == (
        42,
        "ada@example.com",
        "short",
        "req-9",
    )
