"""Retention: finished jobs removed with their attempts, steps, waits, idempotency keys
and debounce rows, in batches; never an unfinished job. By ``rel.purge``, by ``reliable
purge``, and by every worker for ``RELIABLE_RESULT_TTL``; the clock is injected."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
import tenacity
from support import REPO_ROOT, count_jobs, query, wait_until

from reliable import (
    ConfigError,
    ManualClock,
    Reliable,
    Settings,
    sleep,
    step,
    wait_for_event,
)
from reliable.retention import purge
from reliable.store.retention import _OLDEST

DAY = 86400.0


def rows_of(app: Reliable, table: str, job_ids: list[str]) -> int:
    column = "id" if table == "reliable_jobs" else "job_id"
    found = query(app, f"SELECT {column} AS job_id FROM {table}")
    return sum(1 for row in found if row.job_id in job_ids)


def test_purge_removes_finished_jobs_with_what_refers_to_them_and_nothing_unfinished(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def done(n: int) -> int:
        return step("double", lambda: 2 * n)

    @rel.task(retries=1, backoff=tenacity.wait_fixed(1))
    def broken() -> None:
        raise ValueError("no")

    @rel.task(finish_within="1h")
    def waiter() -> object:
        return wait_for_event("approval", "approved")

    @rel.task(debounce="5s", rate_limit="100/day")
    def collapsed(n: int) -> int:
        return n

    @rel.task
    def later() -> None:
        sleep("nap", "30d")

    finished = [
        done.enqueue(1, idempotency_key="order-1").id,
        broken.enqueue().id,
        waiter.enqueue().id,
        collapsed.enqueue(1).id,
        later.enqueue().id,  # cancelled before it ran
    ]
    rel.cancel(finished[-1])
    for _ in range(3):
        rel.run_until_idle()
        clock.advance(1800)
    running, winding_down = later.enqueue().id, later.enqueue().id
    claimed = rel.store.claim("elsewhere", ["default"], 2, clock.now(), 30.0, tasks=["later"])
    assert {job.id for job in claimed.jobs} == {running, winding_down}
    rel.cancel(winding_down)  # its attempt still runs elsewhere, holding its lease
    sleeping = later.enqueue().id
    queued = later.options(delay="30d").enqueue().id
    rel.run_until_idle()  # the sleeping one parks
    statuses = {job_id: rel.get_job(job_id).status for job_id in finished}
    assert sorted(statuses.values()) == ["cancelled", "failed", "failed", "succeeded", "succeeded"]
    assert rows_of(rel, "reliable_attempts", finished) == 3
    assert rows_of(rel, "reliable_steps", finished) == 2
    assert rows_of(rel, "reliable_waits", finished) == 1  # the wait its deadline ended
    assert rows_of(rel, "reliable_idempotency_keys", finished) == 1
    assert rows_of(rel, "reliable_debounces", finished) == 1

    clock.advance(8 * DAY)
    assert rel.purge(older_than="7d") == 5
    for table in (
        "reliable_jobs",
        "reliable_attempts",
        "reliable_steps",
        "reliable_waits",
        "reliable_idempotency_keys",
        "reliable_debounces",
    ):
        assert rows_of(rel, table, finished) == 0, table
    # Admissions count in their rate-limit window whatever became of the job.
    assert rows_of(rel, "reliable_rate_events", finished) == 1
    left = {job_id: rel.get_job(job_id).status for job_id in (sleeping, queued, running)}
    assert left == {sleeping: "sleeping", queued: "queued", running: "running"}
    assert rel.get_job(winding_down).status == "cancelled"
    assert rel.purge(older_than=0) == 0
    assert count_jobs(rel) == 4


def test_purge_keeps_jobs_younger_than_the_cut_off_and_filters_by_status(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(retries=0)
    def work(fail: bool) -> None:
        if fail:
            raise ValueError("failed")

    old = [work.enqueue(False).id, work.enqueue(True).id, work.enqueue(True).id]
    rel.run_until_idle()
    clock.advance(3 * DAY)
    young = [work.enqueue(False).id, work.enqueue(True).id]
    rel.run_until_idle()
    clock.advance(2 * DAY)
    assert rel.purge(older_than="4d", status="failed") == 2
    assert rel.purge(older_than="4d", status=["succeeded", "cancelled"]) == 1
    assert rows_of(rel, "reliable_jobs", old) == 0
    assert rows_of(rel, "reliable_jobs", young) == 2
    assert rel.purge(older_than="1d") == 2


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"older_than": "soon"}, "older_than"),
        ({"older_than": -1}, "older_than"),
        ({"older_than": "7d", "status": "queued"}, "status"),
        ({"older_than": "7d", "status": ["failed", "running"]}, "status"),
        ({"older_than": "7d", "status": []}, "status"),
    ],
)
def test_a_bad_purge_is_a_clear_error_and_removes_nothing(
    rel: Reliable, clock: ManualClock, options: dict[str, Any], name: str
) -> None:
    @rel.task
    def work() -> None: ...

    work.enqueue()
    rel.run_until_idle()
    clock.advance(30 * DAY)
    with pytest.raises(ConfigError) as raised:
        rel.purge(**options)
    assert raised.value.name == name
    assert count_jobs(rel) == 1


def test_purge_goes_in_batches_each_its_own_transaction(
    rel: Reliable, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    @rel.task
    def work(n: int) -> None: ...

    for n in range(5):
        work.enqueue(n)
    rel.run_until_idle()
    clock.advance(DAY)
    batches: list[int] = []
    purge_finished = rel.store.purge_finished

    def spy(before: float, statuses: Any, limit: int) -> int:
        removed = purge_finished(before, statuses, limit)
        batches.append(removed)
        return removed

    monkeypatch.setattr(rel.store, "purge_finished", spy)
    assert purge(rel.store, clock.now(), batch=2) == 5
    assert batches == [2, 2, 1]


def test_the_oldest_finished_jobs_are_read_through_an_index(rel: Reliable) -> None:
    store = rel.store
    compiled = _OLDEST[store.dialect][False].compile(dialect=store.engine.dialect)
    params = compiled.construct_params({"before": 0.0, "limit": 1000})
    args: Any = tuple(params[name] for name in compiled.positiontup or ()) or params
    with store.engine.connect() as connection:
        if store.dialect == "sqlite":
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", args).all()
        else:  # on an empty table the planner would scan; say whether it can use the index
            connection.exec_driver_sql("SET enable_seqscan = off")
            plan = connection.exec_driver_sql(f"EXPLAIN {compiled}", args).all()
        connection.rollback()
    assert "ix_reliable_jobs_finished" in " ".join(str(row) for row in plan)


def test_a_worker_removes_jobs_finished_longer_ago_than_the_result_ttl(
    db_url: str, clock: ManualClock
) -> None:
    app = Reliable(db_url, clock=clock, embedded_worker=False, result_ttl="1h", poll_interval=0.05)

    @app.task
    def work(n: int) -> int:
        return n

    try:
        old = [work.enqueue(n).id for n in range(3)]
        app.run_until_idle()
        clock.advance(3601)
        recent = work.enqueue(9).id
        app.run_until_idle()
        waiting = work.options(delay="2h").enqueue(10).id
        app.start_worker(threads=1)
        wait_until(lambda: count_jobs(app) == 2, 30, "the old jobs to go", lambda: "")
        assert rows_of(app, "reliable_jobs", old) == 0
        assert (app.get_job(recent).status, app.get_job(waiting).status) == (
            "succeeded",
            "queued",
        )
    finally:
        app.close()


def test_a_result_ttl_of_zero_or_none_keeps_finished_jobs() -> None:
    assert Settings.load({"result_ttl": "0"}).result_ttl is None
    assert Settings.load({}, {"RELIABLE_RESULT_TTL": "none"}).result_ttl is None
    assert Settings.load({}, {"RELIABLE_RESULT_TTL": "2d"}).result_ttl == 2 * DAY
    assert Settings.load({}, {}).result_ttl == 7 * DAY
    with pytest.raises(ConfigError, match="RELIABLE_RESULT_TTL"):
        Settings.load({}, {"RELIABLE_RESULT_TTL": "a week"})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reliable.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_the_purge_command_prints_how_many_it_removed(db_url: str) -> None:
    month_ago = ManualClock(time.time() - 30 * DAY)
    app = Reliable(db_url, clock=month_ago, embedded_worker=False)

    @app.task(retries=0)
    def work(fail: bool) -> None:
        if fail:
            raise ValueError("failed")

    for fail in (False, False, True):
        work.enqueue(fail)
    app.run_until_idle()
    app.close()
    completed = run_cli(
        "purge", "--older-than", "7d", "--status", "failed", "--database-url", db_url
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "purged 1 finished job"
    completed = run_cli("purge", "--older-than", "7d", "--database-url", db_url)
    assert completed.stdout.strip() == "purged 2 finished jobs"
    completed = run_cli("purge", "--older-than", "7d", "--database-url", db_url)
    assert completed.stdout.strip() == "purged 0 finished jobs"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "7d", "--status", "running"], "--status: must be succeeded"),
        (["--older-than", "a while"], "--older-than: must be a duration"),
        ([], "--older-than"),
    ],
)
def test_a_bad_purge_command_exits_2_saying_why(db_url: str, args: list[str], message: str) -> None:
    completed = run_cli("purge", *args, "--database-url", db_url)
    assert completed.returncode == 2
    assert message in completed.stderr
