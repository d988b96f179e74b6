"""A newcomer sees what happens: failed attempts in the log, the last error in the status
document while a job is retried, the real status in a replayed 202, and errors that say
what to do at enqueue."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tenacity
from flask import Flask

from reliable import ConfigError, ManualClock, Reliable, SerializationError
from reliable.integrations.flask import ReliableFlask

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_every_failed_attempt_is_logged_with_what_comes_next(
    rel: Reliable, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    @rel.task(retries=1, backoff=tenacity.wait_fixed(30))
    def flaky() -> None:
        raise RuntimeError("the mail server is down")

    handle = flaky.enqueue()
    with caplog.at_level(logging.INFO, logger="reliable"):
        rel.run_until_idle()
        clock.advance(30)
        rel.run_until_idle()
    retried, failed = [r for r in caplog.records if r.name.startswith("reliable")]
    assert retried.levelno == logging.WARNING
    assert f"job {handle.id} (flaky): attempt 1 of 2 failed" in retried.getMessage()
    assert "RuntimeError: the mail server is down" in retried.getMessage()
    assert "next attempt in 30.0s" in retried.getMessage()
    assert failed.levelno == logging.ERROR and failed.exc_info is not None
    assert "attempt 2 of 2 failed" in failed.getMessage()
    assert "no attempts left" in failed.getMessage()


def test_worker_start_stop_and_failures_reach_stderr_before_logging_is_configured(
    tmp_path: Path,
) -> None:
    program = textwrap.dedent(
        f"""
        import logging, sys
        from reliable import Reliable
        rel = Reliable({f"sqlite:///{tmp_path / 'jobs.db'}"!r}, retries=0)

        @rel.task
        def broken() -> None:
            raise ValueError("bad input")

        rel.start_worker(threads=1)
        try:
            broken.enqueue().wait(timeout=20)
        finally:
            rel.stop_worker(timeout=5)
        if sys.argv[1:] == ["configured"]:
            logging.basicConfig(level=logging.INFO, format="root: %(message)s")
            rel.start_worker(threads=1)
            rel.stop_worker(timeout=5)
        """
    )
    unconfigured = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert unconfigured.returncode == 0, unconfigured.stderr
    lines = unconfigured.stderr.splitlines()
    assert any("INFO reliable.worker: worker" in line and "started" in line for line in lines)
    assert any(
        "ERROR reliable.worker: job" in line and "ValueError: bad input" in line for line in lines
    )
    assert any(line.endswith("stopped") for line in lines)
    # Once the application configures logging, its handlers print them, and only once.
    configured = subprocess.run(
        [sys.executable, "-c", program, "configured"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert configured.returncode == 0, configured.stderr
    later = configured.stderr.splitlines()[len(lines) :]
    started = [line for line in later if "started" in line]
    assert len(started) == 1 and started[0].startswith("root: worker")


@pytest.fixture
def shop(rel: Reliable) -> Flask:
    app = Flask("visible")
    attempts: list[int] = []

    @app.post("/charge")
    @rel.offload(retries=3, backoff=tenacity.wait_fixed(10))
    def charge() -> Any:
        attempts.append(1)
        if len(attempts) < 2:
            raise ConnectionError("the payment provider timed out")
        return {"charged": True}, 201

    ReliableFlask(app, rel)
    return app


def test_the_status_document_shows_the_last_error_while_the_job_is_retried(
    shop: Flask, rel: Reliable, clock: ManualClock
) -> None:
    client = shop.test_client()
    job_id = client.post("/charge").get_json()["id"]
    rel.run_until_idle()
    retrying = client.get(f"/_reliable/jobs/{job_id}").get_json()
    assert (retrying["status"], retrying["attempts"]) == ("queued", 1)
    assert retrying["error"]["type"] == "ConnectionError"
    assert retrying["error"]["message"] == "the payment provider timed out"
    assert "traceback" not in retrying["error"]
    clock.advance(10)
    rel.run_until_idle()
    done = client.get(f"/_reliable/jobs/{job_id}").get_json()
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 2, None)


def test_a_202_replayed_after_the_job_finished_shows_its_status(
    shop: Flask, rel: Reliable, clock: ManualClock
) -> None:
    client = shop.test_client()
    first = client.post("/charge", headers={"Idempotency-Key": "charge-1"})
    assert first.get_json()["status"] == "queued"
    rel.run_until_idle()
    clock.advance(10)
    rel.run_until_idle()
    replay = client.post("/charge", headers={"Idempotency-Key": "charge-1"})
    assert replay.status_code == 202
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["status"] == "succeeded"


def test_enqueue_checks_the_arguments_against_the_signature(rel: Reliable) -> None:
    @rel.task
    def send_invoice(order_id: int, *, copy: bool = False) -> None: ...

    with pytest.raises(TypeError, match="send_invoice: missing a required argument: 'order_id'"):
        send_invoice.enqueue()
    with pytest.raises(TypeError, match="send_invoice: too many positional arguments"):
        send_invoice.enqueue(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'coppy'"):
        send_invoice.enqueue(1, coppy=True)
    assert rel.store.count_by_status() == {}


def test_an_argument_that_cannot_be_stored_is_named(rel: Reliable) -> None:
    @rel.task
    def notify(user_id: int, channel: object) -> None: ...

    with pytest.raises(SerializationError, match="argument 'channel' of notify: cannot store"):
        notify.enqueue(7, channel=object())
    assert rel.store.count_by_status() == {}


def test_an_over_long_idempotency_key_is_not_echoed_in_full(rel: Reliable) -> None:
    @rel.task
    def work() -> None: ...

    key = "k" * 10_000
    with pytest.raises(ConfigError) as refused:
        work.enqueue(idempotency_key=key)
    assert len(str(refused.value)) < 200
    assert "10000 characters" in str(refused.value)
