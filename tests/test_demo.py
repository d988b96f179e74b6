"""The README's ``make demo`` and ``make quickstart`` do what it says, run as the Makefile
runs them (its recipe, with this interpreter), on a SQLite file of the test's own."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from support import query

from reliable import Reliable

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # bounds a hang only


def recipe(target: str) -> list[str]:
    """The command of a one-line Makefile target, ``$(BIN)/python`` being this Python."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    match = re.search(rf"^{target}:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert match, f"no one-line recipe for {target} in the Makefile"
    command = shlex.split(match.group(1))
    assert command[0] == "$(BIN)/python", command
    return [sys.executable, *command[1:]]


def environment(database: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_")}
    env["RELIABLE_DATABASE_URL"] = f"sqlite:///{database}"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Lines:
    """What a child prints, read by a thread so that waiting for a line has a deadline."""

    def __init__(self, stream: IO[str], log: Path) -> None:
        self.log = log
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def until(self, pattern: str) -> re.Match[str]:
        """The first line (from here on) that matches ``pattern``."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail(f"no line matching {pattern!r}; printed:\n{self.printed()}")
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def printed(self) -> str:
        return "\n".join(self.seen) + f"\n--- stderr:\n{self.log.read_text()[-3000:]}"


def curl_request(line: str) -> dict[str, Any]:
    """The request of a ``curl -i -X METHOD URL -H ... -d ...`` line, for ``httpx.request``."""
    words = shlex.split(line)
    assert words[0] == "curl", line
    request: dict[str, Any] = {"method": "GET", "headers": {}}
    options = iter(words[1:])
    for word in options:
        if word == "-i":
            continue  # show the response headers: the test reads them anyway
        if word == "-X":
            request["method"] = next(options)
        elif word == "-H":
            name, _, value = next(options).partition(":")
            request["headers"][name.strip()] = value.strip()
        elif word == "-d":
            request["content"] = next(options)
        elif word.startswith("-"):
            pytest.fail(f"the test does not know curl's {word} ({line})")
        else:
            request["url"] = word
    return request


def send_when_listening(request: dict[str, Any], printed: Lines) -> httpx.Response:
    """Send ``request``; until the server listens, a refused connection is tried again
    (nothing was sent then)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return httpx.request(**request, timeout=WAIT)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                pytest.fail(f"the demo never listened on {request['url']}\n{printed.printed()}")
            time.sleep(0.05)


@pytest.mark.slow
def test_make_demo_serves_the_flask_example_and_its_worker_runs_the_curl_line(
    tmp_path: Path,
) -> None:
    database = tmp_path / "demo.db"
    log = tmp_path / "demo.log"
    env = environment(database, DEMO_PORT=str(free_port()), DEMO_EMAIL_FAILURE_RATE="0")
    with log.open("w") as stderr:
        demo = subprocess.Popen(
            recipe("demo"), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        assert demo.stdout is not None
        printed = Lines(demo.stdout, log)
        post = curl_request(printed.until(r"^\s*(curl -i -X POST .*)$").group(1))
        status_url = printed.until(r"follow the Location header: curl '([^']+)'").group(1)

        accepted = send_when_listening(post, printed)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        assert status_url.replace("<id>", job_id).startswith(
            str(httpx.URL(post["url"]).join(accepted.headers["location"]))
        )
        deadline = time.monotonic() + WAIT
        document = httpx.get(status_url.replace("<id>", job_id), timeout=WAIT).json()
        while document["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"{document}\n{printed.printed()}"
            document = httpx.get(status_url.replace("<id>", job_id), timeout=WAIT).json()
        assert document["status"] == "succeeded", document
        assert document["result"]["status_code"] == 201
        body = document["result"]["body"]
        assert (body["order_id"], body["email"], body["template"]) == (
            42,
            "ada@example.com",
            "short",
        )
        assert body["request_id"] == "demo-1"

        demo.send_signal(signal.SIGTERM)
        code = demo.wait(WAIT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    # SIGTERM ends the process through Python's exit, where the worker stops and leaves.
    assert code == 128 + signal.SIGTERM, printed.printed()
    assert "Traceback" not in log.read_text(), printed.printed()
    assert database.exists()  # the demo kept its jobs in the test's file
    observer = Reliable(f"sqlite:///{database}", embedded_worker=False)
    try:
        assert query(observer, "SELECT id FROM reliable_workers") == []
        assert observer.get_job(job_id).status == "succeeded"
    finally:
        observer.close()


@pytest.mark.slow
def test_make_quickstart_runs_its_jobs_to_the_end(tmp_path: Path) -> None:
    env = environment(tmp_path / "demo.db")
    run = subprocess.run(
        recipe("quickstart"), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 5, run.stdout
    receipt, add, refused, charged, charged_again = lines
    assert receipt.startswith("send_receipt") and "attempts=3" in receipt, receipt
    assert "succeeded: {'order': 42, 'sent_to': 'ada@example.com', 'tries': 3}" in receipt
    assert add.startswith("add") and add.endswith("succeeded: 5"), add
    assert refused.startswith("charge") and "failed:" in refused, refused
    assert "cannot charge 0" in refused and "attempts=1" in refused, refused
    assert charged.endswith("succeeded: 'charged 10'"), charged
    assert charged_again == charged  # the same idempotency key: the same job
