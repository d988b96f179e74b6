"""The ``reliable`` executable as an operator uses it: list and show jobs, retry, cancel
and replay them one by one or in bulk (with a confirmation that shows the count),
pause and resume, schedules, the schema revision, the dashboard; tables for people,
JSON for scripts, and the documented exit codes (0 ok, 1 error, 2 usage, 3 not found)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from reliable import Reliable

BIN = Path(sys.executable).parent / "reliable"


def reliable(
    *args: str, db_url: str | None = None, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``reliable *args`` (with ``--database-url``), the real executable."""
    command = [str(BIN), *args]
    if db_url is not None:
        command += ["--database-url", db_url]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin if stdin is not None else "",
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "RELIABLE_DATABASE_URL"},
    )


def as_json(completed: subprocess.CompletedProcess[str]) -> Any:
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.fixture
def app(db_url: str) -> Reliable:
    """An application with three failed ``charge`` jobs and two queued ``email`` jobs
    (one in queue ``bulk``), its store closed so only the CLI touches it."""
    rel = Reliable(db_url, embedded_worker=False)

    @rel.task(retries=0)
    def charge(n: int) -> None:
        raise RuntimeError(f"card {n} declined")

    @rel.task
    def email(to: str) -> None:
        pass

    for n in range(3):
        charge.enqueue(n)
    rel.run_until_idle()
    email.enqueue("ann@example.com")
    email.options(queue="bulk").enqueue("bob@example.com")
    rel.close()
    return rel


def statuses(rel: Reliable, **filters: Any) -> list[str]:
    found = sorted(info.status for info in rel.jobs(**filters))
    rel.close()
    return found


def test_jobs_list_filters_pages_and_prints_a_table(app: Reliable, db_url: str) -> None:
    listed = as_json(reliable("jobs", "list", "--task", "charge", "--json", db_url=db_url))
    assert [job["status"] for job in listed["jobs"]] == ["failed"] * 3
    assert "declined" in listed["jobs"][0]["error"]["message"]
    queued = as_json(reliable("jobs", "list", "--status", "queued", "--json", db_url=db_url))
    assert {job["task"] for job in queued["jobs"]} == {"email"}
    bulk = as_json(reliable("jobs", "list", "--queue", "bulk", "--json", db_url=db_url))
    assert [job["queue"] for job in bulk["jobs"]] == ["bulk"]
    found = as_json(reliable("jobs", "list", "--error", "card 1", "--json", db_url=db_url))
    assert len(found["jobs"]) == 1

    # Pages: --limit, then --after the last id; no job twice, none left out.
    first = as_json(reliable("jobs", "list", "--limit", "2", "--json", db_url=db_url))
    assert len(first["jobs"]) == 2 and first["next_after"] == first["jobs"][-1]["id"]
    rest = as_json(
        reliable("jobs", "list", "--after", first["next_after"], "--json", db_url=db_url)
    )
    ids = [job["id"] for job in first["jobs"] + rest["jobs"]]
    assert len(ids) == len(set(ids)) == 5

    table = reliable("jobs", "list", "--task", "charge", db_url=db_url)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "TASK", "STATUS"]
    assert len(rows) == 3 and all("RuntimeError: card" in row for row in rows)


def test_jobs_show_prints_the_job_and_exits_3_for_an_unknown_id(app: Reliable, db_url: str) -> None:
    [failed, *_] = app.jobs(task="charge")
    app.close()
    document = as_json(reliable("jobs", "show", failed.id, "--json", db_url=db_url))
    assert (document["id"], document["status"]) == (failed.id, "failed")
    shown = reliable("jobs", "show", failed.id, db_url=db_url)
    assert shown.returncode == 0, shown.stderr
    assert f"id:              {failed.id}" in shown.stdout
    assert "RuntimeError: card" in shown.stdout
    missing = reliable("jobs", "show", "f" * 32, db_url=db_url)
    assert missing.returncode == 3
    assert "no job with id" in missing.stderr and "Traceback" not in missing.stderr


def test_bulk_retry_shows_the_count_asks_and_honours_no_and_dry_run(
    app: Reliable, db_url: str
) -> None:
    args = ("jobs", "retry", "--all-matching", "--task", "charge")
    dry = reliable(*args, "--dry-run", db_url=db_url)
    assert dry.returncode == 0, dry.stderr
    assert "would retry 3 jobs" in dry.stdout
    declined = reliable(*args, db_url=db_url, stdin="n\n")
    assert declined.returncode == 1
    assert "Retry 3 matching jobs?" in declined.stderr
    assert statuses(app, task="charge") == ["failed"] * 3  # nothing changed either time

    confirmed = reliable(*args, db_url=db_url, stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "retried 3 of 3 jobs" in confirmed.stdout
    assert "retrying" in confirmed.stderr  # the progress bar (its label, off a terminal)
    assert statuses(app, task="charge") == ["queued"] * 3


def test_bulk_cancel_with_yes_acts_only_on_the_matching_jobs(app: Reliable, db_url: str) -> None:
    result = as_json(
        reliable("jobs", "cancel", "--all-matching", "--queue", "bulk", "--yes", "--json",
                 db_url=db_url)
    )  # fmt: skip
    assert result == {"matched": 1, "dry_run": False, "cancelled": 1, "not_found": []}
    assert statuses(app, task="email", queue="bulk") == ["cancelled"]
    assert statuses(app, task="email", queue="default") == ["queued"]


def test_cancel_retry_and_replay_by_id(app: Reliable, db_url: str) -> None:
    queued = app.jobs(task="email", queue="default")[0].id
    failed = app.jobs(task="charge")[0].id
    app.close()
    cancelled = reliable("jobs", "cancel", queued, db_url=db_url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled 1 of 1 job" in cancelled.stdout
    again = reliable("jobs", "cancel", queued, db_url=db_url)
    assert "cancelled 0 of 1 job" in again.stdout  # already finished: left as it is
    assert app.get_job(queued).status == "cancelled"

    replayed = as_json(reliable("jobs", "replay", failed, "--json", db_url=db_url))
    [new_id] = replayed["created"]
    new = app.get_job(new_id)
    assert (new.replay_of, new.status, new.task) == (failed, "queued", "charge")
    assert app.get_job(failed).status == "failed"  # the original stays as it was

    retried = reliable("jobs", "retry", failed, db_url=db_url)
    assert retried.returncode == 0, retried.stderr
    assert app.get_job(failed).status == "queued"
    unknown = reliable("jobs", "retry", "0" * 32, db_url=db_url)
    assert unknown.returncode == 3
    assert "no job with id" in unknown.stderr
    app.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "cancel"], "give one or more job ids, or --all-matching"),
        (["jobs", "cancel", "abc", "--all-matching"], "not both"),
        (["jobs", "retry", "abc", "--task", "charge"], "filters go with --all-matching"),
        (["jobs", "list", "--status", "done"], "--status"),
        (["jobs", "list", "--since", "last tuesday"], "--since: expected a date"),
        (["jobs", "list", "--limit", "5000"], "--limit"),
        (["pause"], "give either --task or --queue"),
        (["jobs", "frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_saying_what_is_wrong(
    db_url: str, args: list[str], message: str
) -> None:
    completed = reliable(*args, db_url=db_url)
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_pause_and_resume_reach_every_worker_through_the_store(db_url: str) -> None:
    rel = Reliable(db_url, embedded_worker=False)
    assert reliable("pause", "--task", "email", db_url=db_url).stdout.strip() == "paused task email"
    assert reliable("pause", "--queue", "bulk", db_url=db_url).returncode == 0
    assert rel.paused() == {"tasks": ["email"], "queues": ["bulk"]}
    resumed = reliable("resume", "--task", "email", db_url=db_url)
    assert resumed.stdout.strip() == "resumed task email"
    assert "was not paused" in reliable("resume", "--task", "email", db_url=db_url).stdout
    assert rel.paused() == {"tasks": [], "queues": ["bulk"]}
    rel.close()


def test_db_current_tells_whether_the_schema_is_this_versions(db_url: str) -> None:
    assert reliable("db", "upgrade", db_url=db_url).returncode == 0
    current = as_json(reliable("db", "current", "--json", db_url=db_url))
    assert current["current"] is True and current["revision"] == current["expected"]
    assert "(current)" in reliable("db", "current", db_url=db_url).stdout


SCHEDULED_APP = """
from reliable import Reliable

rel = Reliable({url!r})


@rel.cron("0 3 * * *", tz="Europe/Paris")
def nightly() -> None:
    pass
"""


def test_schedules_lists_the_applications_cron_schedules(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "scheduled_app.py").write_text(SCHEDULED_APP.format(url=db_url))
    listed = as_json(reliable("schedules", "scheduled_app:rel", "--json", cwd=tmp_path))
    [nightly] = listed["schedules"]
    assert (nightly["cron"], nightly["timezone"]) == ("0 3 * * *", "Europe/Paris")
    assert nightly["next_run_at"] is not None
    table = reliable("schedules", "scheduled_app:rel", cwd=tmp_path)
    assert "nightly" in table.stdout and "Europe/Paris" in table.stdout
    missing = reliable("schedules", "no_such_module:rel", cwd=tmp_path)
    assert missing.returncode == 2
    assert "cannot import 'no_such_module'" in missing.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_dashboard_serves_the_jobs_on_the_given_port(app: Reliable, db_url: str) -> None:
    port = free_port()
    server = subprocess.Popen(
        [str(BIN), "dashboard", "--database-url", db_url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
                    body = page.read().decode()
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the dashboard never answered"
                time.sleep(0.2)
        assert "charge" in body or "email" in body
    finally:
        server.terminate()
        server.wait(timeout=60)
        if server.stderr is not None:
            server.stderr.close()
