"""SIGTERM to a web process running embedded worker threads: the attempt that finishes
within the grace period finishes; the one that does not is given back at once when the
process exits (not when its lease expires), uncounted, for another worker to run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reliable import Reliable

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0

SERVERS = {
    "flask-gunicorn": [
        "-m", "gunicorn", "-w", "1", "-b", "127.0.0.1:{port}", "tests.apps.embedded_flask:app"
    ],
    "flask-own-server": ["-m", "tests.apps.embedded_flask", "{port}"],
    "starlette-uvicorn": [
        "-m", "uvicorn", "tests.apps.embedded_starlette:app", "--port", "{port}",
        "--log-level", "warning",
    ],
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def until(condition: object, what: str, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}\n{log.read_text()}")
        time.sleep(0.02)


@pytest.fixture
def observer(db_url: str) -> Iterator[Reliable]:
    rel = Reliable(db_url, embedded_worker=False)
    rel.store  # noqa: B018 - the schema exists before the server starts
    yield rel
    rel.close()


@pytest.mark.slow
@pytest.mark.parametrize("server", sorted(SERVERS))
def test_sigterm_finishes_what_it_can_and_gives_back_the_rest_at_once(
    server: str, db_url: str, observer: Reliable, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    port = free_port()
    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "RELIABLE_DATABASE_URL": db_url,
        "RELIABLE_SHUTDOWN_GRACE": "5",
        "RELIABLE_LEASE_SECONDS": "120",  # so that "at once" cannot be a lease expiring
        "RELIABLE_WORKER_THREADS": "2",
        "EMBEDDED_APP_MARKERS": str(markers),
    }
    command = [sys.executable, *(part.format(port=port) for part in SERVERS[server])]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(base + "/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        until(answers, "the server answers", log)
        finishing = httpx.post(base + "/jobs/finishing", timeout=5).json()["id"]
        deaf = httpx.post(base + "/jobs/deaf", timeout=5).json()["id"]
        until(
            lambda: (
                (markers / "finishing.started").exists() and (markers / "deaf.started").exists()
            ),
            "both attempts run",
            log,
        )
        process.send_signal(signal.SIGTERM)
        (markers / "finishing.release").touch()  # finishes within the grace period
        process.wait(WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    done = observer.get_job(finishing)
    assert done.status == "succeeded", log.read_text()
    assert done.result["body"] == {"done": "finishing"}
    given_back = observer.get_job(deaf)
    assert (given_back.status, given_back.attempts) == ("queued", 0), log.read_text()
    row = observer.store.get_job(deaf)
    assert row is not None and row.lease_owner is None
