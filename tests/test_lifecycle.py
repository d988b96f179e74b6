"""An operator acts on jobs: cancel (also on an event), retry, replay (from a step, in
bulk), list a page at a time, pause and resume; a job whose task no worker knows waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest
import tenacity

from reliable import CancelOn, ConfigError, JobNotFound, ManualClock, Reliable, step

WAIT = 20.0


def until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


# -- cancel -----------------------------------------------------------------------------


def test_an_event_cancels_the_jobs_it_matches(rel: Reliable) -> None:
    ran: list[int] = []

    @rel.task(cancel_on=CancelOn("order.cancelled", match={"order.id": "arg:order_id"}))
    def ship(order_id: int) -> None:
        ran.append(order_id)

    @rel.task(cancel_on="store.closed")
    def restock() -> None:
        ran.append(0)

    first, second, third = ship.enqueue(1), ship.enqueue(2), restock.enqueue()
    assert rel.send_event("order.cancelled", {"order": {"id": 2}}) == []
    assert (first.status(), second.status(), third.status()) == ("queued", "cancelled", "queued")
    rel.send_event("store.closed")
    assert third.status() == "cancelled"
    assert rel.run_until_idle() == 1
    assert ran == [1]


def test_cancel_on_is_checked_when_the_decorator_runs(rel: Reliable) -> None:
    with pytest.raises(ConfigError, match="cancel_on"):

        @rel.task(cancel_on=CancelOn("x", match={"id": "arg:missing"}))
        def work(order_id: int) -> None: ...


def test_an_async_job_cancelled_while_it_awaits_gets_cancelled_error(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False)
    inside, saw = threading.Event(), threading.Event()

    @app.task
    async def poll() -> None:
        inside.set()
        try:
            while True:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            saw.set()
            raise

    app.start_worker(threads=1)
    try:
        handle = poll.enqueue()
        assert inside.wait(WAIT)
        assert app.cancel(handle.id)
        assert saw.wait(WAIT)
        until(lambda: app.store.get_job(handle.id).lease_owner is None, "the attempt ended")  # type: ignore[union-attr]
        assert handle.status() == "cancelled"
    finally:
        app.stop_worker(timeout=5)
        app.close()


def test_with_a_cap_of_one_the_next_job_starts_only_after_the_cancelled_attempt_returned(
    db_url: str,
) -> None:
    app = Reliable(db_url, embedded_worker=False)
    events: list[str] = []
    inside, release = threading.Event(), threading.Event()

    @app.task(concurrency=1)
    def work(n: int) -> None:
        events.append(f"start {n}")
        if n == 1:
            inside.set()
            release.wait(WAIT)  # no step boundary: the cancel cannot stop it early
        events.append(f"end {n}")

    app.start_worker(threads=4)
    try:
        first = work.enqueue(1)
        assert inside.wait(WAIT)
        second = work.enqueue(2)
        assert app.cancel(first.id)
        assert first.status() == "cancelled"
        # The cancelled attempt still runs: its slot is not free, the second job waits.
        time.sleep(0.5)
        assert events == ["start 1"]
        assert second.status() == "queued"
        release.set()
        until(lambda: second.status() == "succeeded", "the second job ran")
        assert events == ["start 1", "end 1", "start 2", "end 2"]
        assert first.status() == "cancelled"
    finally:
        release.set()
        app.stop_worker(timeout=5)
        app.close()


# -- retry and replay -------------------------------------------------------------------


def test_retry_runs_a_failed_job_again_with_its_steps_kept(
    rel: Reliable, clock: ManualClock
) -> None:
    calls: Counter[str] = Counter()
    broken = True

    def charge() -> str:
        calls["charge"] += 1
        return "charged"

    @rel.task(retries=1, backoff=tenacity.wait_fixed(0))
    def checkout() -> str:
        step("charge", charge)
        calls["mail"] += 1
        if broken:
            raise ConnectionError("mail server down")
        return "done"

    handle = checkout.enqueue()
    rel.run_until_idle()
    rel.run_until_idle()
    assert (handle.status(), rel.get_job(handle.id).attempts) == ("failed", 2)
    broken = False
    assert rel.retry(handle.id) is True
    assert rel.retry(handle.id) is False  # queued already
    assert rel.run_until_idle() == 1
    info = rel.get_job(handle.id)
    assert (info.status, info.result, info.attempts) == ("succeeded", "done", 3)
    assert calls == {"charge": 1, "mail": 3}


def test_retry_gives_a_fresh_attempt_budget_and_refuses_what_is_not_failed(
    rel: Reliable,
) -> None:
    @rel.task(retries=0)
    def fails() -> None:
        raise ValueError("no")

    handle = fails.enqueue()
    rel.run_until_idle()
    assert handle.status() == "failed"
    assert rel.retry(handle.id)
    rel.run_until_idle()  # one more real attempt, not "no attempts left"
    [_first, second] = rel.get_attempts(handle.id)
    assert second.error is not None and second.error["message"] == "no"
    with pytest.raises(JobNotFound):
        rel.retry("0" * 32)


def test_a_cancelled_job_can_be_retried(rel: Reliable) -> None:
    @rel.task
    def work() -> str:
        return "ran"

    handle = work.enqueue()
    rel.cancel(handle.id)
    assert rel.retry(handle.id)
    rel.run_until_idle()
    assert handle.result(timeout=1) == "ran"


def test_replay_makes_a_new_job_from_the_same_input_and_can_start_at_a_step(
    rel: Reliable,
) -> None:
    calls: Counter[str] = Counter()

    def effect(name: str) -> str:
        calls[name] += 1
        return f"{name}-{calls[name]}"

    @rel.task
    def pipeline(n: int) -> list[str]:
        return [step(name, effect, name) for name in ("fetch", "transform", "load")] + [str(n)]

    original = pipeline.enqueue(7)
    rel.run_until_idle()
    assert original.result(timeout=1) == ["fetch-1", "transform-1", "load-1", "7"]
    again = rel.replay(original.id)
    rel.run_until_idle()
    assert again.result(timeout=1) == ["fetch-2", "transform-2", "load-2", "7"]
    partial = rel.replay(original.id, from_step="transform")
    rel.run_until_idle()
    assert partial.result(timeout=1) == ["fetch-1", "transform-3", "load-3", "7"]
    assert rel.get_job(partial.id).replay_of == original.id
    assert rel.get_job(original.id).result == ["fetch-1", "transform-1", "load-1", "7"]
    with pytest.raises(ConfigError, match="no step 'nope'"):
        rel.replay(original.id, from_step="nope")
    with pytest.raises(JobNotFound):
        rel.replay("0" * 32)


# -- listings and bulk actions ----------------------------------------------------------


def test_jobs_are_listed_newest_first_a_page_at_a_time_with_filters(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(queue="mail", retries=0)
    def send(n: int) -> None:
        if n % 3 == 0:
            raise ValueError(f"bad address {n}")

    @rel.task
    def other() -> None: ...

    handles = []
    for n in range(10):
        handles.append(send.enqueue(n, idempotency_key=f"send-{n}"))
        clock.advance(1)
    other.enqueue()
    rel.run_until_idle()
    newest_first = [h.id for h in reversed(handles)]
    pages, after = [], None
    while page := rel.jobs(task="send", limit=4, after=after):
        pages.append([job.id for job in page])
        after = page[-1].id
    assert [len(p) for p in pages] == [4, 4, 2]
    assert [job for page in pages for job in page] == newest_first
    failed = rel.jobs(status="failed", queue="mail")
    assert {job.id for job in failed} == {handles[n].id for n in (0, 3, 6, 9)}
    assert [job.id for job in rel.jobs(key="send-4")] == [handles[4].id]
    assert [job.id for job in rel.jobs(error="address 6")] == [handles[6].id]
    start = rel.get_job(handles[0].id).created_at  # then one job a second
    window = rel.jobs(task="send", since=start.timestamp() + 2, until=start + timedelta(seconds=5))
    assert [job.id for job in window] == [handles[n].id for n in (4, 3, 2)]
    with pytest.raises(ConfigError, match="status"):
        rel.jobs(status="done")
    with pytest.raises(ConfigError, match="limit"):
        rel.jobs(limit=0)


def test_bulk_actions_reach_every_matching_job_not_one_page(rel: Reliable) -> None:
    @rel.task(retries=0)
    def flaky(n: int) -> None:
        raise RuntimeError("down")

    @rel.task
    def idle(n: int) -> None: ...

    for n in range(1200):
        flaky.enqueue(n)
    for n in range(3):
        idle.enqueue(n)
    assert rel.run_until_idle() == 1203
    assert rel.retry_jobs(task="flaky", dry_run=True) == 1200
    assert rel.store.count_by_status() == {"failed": 1200, "succeeded": 3}
    assert rel.retry_jobs(task="flaky") == 1200
    assert rel.store.count_by_status() == {"queued": 1200, "succeeded": 3}
    assert rel.cancel_jobs(task="flaky", dry_run=True) == 1200
    reports: list[tuple[int, int]] = []
    assert rel.cancel_jobs(task="flaky", progress=lambda *report: reports.append(report)) == 1200
    assert reports == [(500, 1200), (1000, 1200), (1200, 1200)]  # one report a batch
    assert rel.store.count_by_status() == {"cancelled": 1200, "succeeded": 3}
    assert rel.replay_jobs(task="idle") == 3
    assert rel.store.count_by_status() == {"cancelled": 1200, "succeeded": 3, "queued": 3}


# -- pause and resume -------------------------------------------------------------------


def test_a_paused_task_or_queue_waits_and_nothing_is_lost(rel: Reliable) -> None:
    @rel.task
    def report() -> str:
        return "report"

    @rel.task(queue="bulk")
    def export() -> str:
        return "export"

    rel.pause(task="report")
    rel.pause(queue="bulk")
    assert rel.paused() == {"tasks": ["report"], "queues": ["bulk"]}
    first, second = report.enqueue(), export.enqueue()
    assert rel.run_until_idle() == 0
    assert rel.resume(task="report") is True
    assert rel.resume(task="report") is False
    assert rel.run_until_idle() == 1
    assert (first.status(), second.status()) == ("succeeded", "queued")
    rel.resume(queue="bulk")
    assert rel.run_until_idle() == 1
    with pytest.raises(ConfigError):
        rel.pause()


def test_a_pause_made_elsewhere_reaches_a_running_worker(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False, poll_interval=0.1)
    elsewhere = Reliable(db_url, embedded_worker=False)

    @app.task
    def report(n: int) -> int:
        return n

    @app.task
    def ping() -> str:
        return "pong"

    app.start_worker(threads=2)
    try:
        elsewhere.pause(task="report")
        until(lambda: "report" in app.runtime.paused().get("task", ()), "the worker sees it")
        paused = report.enqueue(1)
        assert ping.enqueue().result(timeout=WAIT) == "pong"  # the worker claims meanwhile
        assert paused.status() == "queued"
        elsewhere.resume(task="report")
        assert paused.result(timeout=WAIT) == 1
    finally:
        app.stop_worker(timeout=5)
        app.close()
        elsewhere.close()


# -- tasks no worker knows --------------------------------------------------------------


def test_a_job_of_a_task_no_worker_knows_waits_and_is_flagged(
    db_url: str, clock: ManualClock
) -> None:
    old = Reliable(db_url, embedded_worker=False, clock=clock)
    new = Reliable(db_url, embedded_worker=False, clock=clock)

    @old.task
    def legacy() -> str:
        return "legacy"

    @old.task
    def send_email(to: str) -> str:
        return to

    @new.task(aliases=["send_email"])
    def deliver_email(to: str) -> str:
        return f"delivered to {to}"

    try:
        waiting, renamed = legacy.enqueue(), send_email.enqueue("ada")
        new.store.heartbeat(  # a live worker that runs the new code's tasks only
            "new-worker",
            [],
            clock.now,
            30,
            hostname="h",
            pid=1,
            queues=["default"],
            threads=1,
            started_at=clock.now(),
            tasks=list(new.tasks),
        )
        assert new.run_until_idle() == 1  # the renamed task's job, under its alias
        assert renamed.result(timeout=1) == "delivered to ada"
        [listed] = new.jobs(status="queued")
        assert (listed.id, listed.task_unknown, listed.status) == (waiting.id, True, "queued")
        assert [job.task_unknown for job in new.jobs(status="succeeded")] == [False]
    finally:
        old.close()
        new.close()
