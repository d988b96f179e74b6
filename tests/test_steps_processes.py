"""Durable steps across real processes: kill -9 mid-job, restarts during a sleep, events.

Workers run ``reliable worker tests.apps.flow_app:rel``. Every execution of a step's
function adds a row to ``step_runs`` (job id, step, pid, time), so a test counts how
often each step really ran, and where; this process enqueues, sends events and reads.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import (
    Processes,
    drop_table,
    has_table,
    leases_of,
    query,
    start_workers,
    task,
    wait_for_status,
    wait_until,
)

from reliable import Reliable

APP = "tests.apps.flow_app:rel"
# Long enough for another job to run and the worker to be killed before the sleep ends,
# also on a busy machine.
NAP_SECONDS = 5.0


@pytest.fixture
def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
    with Processes(tmp_path, db_url, app=APP) as started:
        yield started


@pytest.fixture
def client(db_url: str) -> Iterator[Reliable]:
    """The enqueuing side: the flow app's step tasks by name, and a view of the database."""
    app = Reliable(db_url, embedded_worker=False)

    @app.task(name="three_steps", retries=3)
    def three_steps(n: int, pause: str = "") -> int:
        raise AssertionError("runs in the worker processes")

    @app.task(name="sleeper", concurrency=1)
    def sleeper(n: int, seconds: float) -> int:
        raise AssertionError("runs in the worker processes")

    @app.task(name="waiter")
    def waiter(order_id: int) -> Any:
        raise AssertionError("runs in the worker processes")

    drop_table(app, "step_runs")  # PostgreSQL keeps it between tests; ids never repeat
    yield app
    drop_table(app, "step_runs")
    app.close()


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    folder = tmp_path / "gates"
    folder.mkdir()
    return folder


def step_runs(client: Reliable, job_id: str) -> dict[str, list[Any]]:
    """Step name -> one row (pid, at) per execution of its function, in order."""
    runs: dict[str, list[Any]] = defaultdict(list)
    if has_table(client, "step_runs"):
        sql = "SELECT step, pid, at FROM step_runs WHERE job_id = :job_id ORDER BY id"
        for row in query(client, sql, job_id=job_id):
            runs[row.step].append(row)
    return dict(runs)


@pytest.mark.slow
@pytest.mark.parametrize("pause", ["between", "inside"])
def test_a_job_killed_mid_way_does_not_repeat_its_completed_steps(
    client: Reliable, processes: Processes, gates: Path, pause: str
) -> None:
    """kill -9 of the worker running a three-step job, between steps 2 and 3
    (``between``) or in the middle of step 2 (``inside``): once the lease expires the
    other worker takes the job over, replays the completed steps from storage - step 1,
    and step 2 when it had completed, ran exactly once - runs the rest (step 2 again
    when it was cut short), and the job succeeds with the result built from them all."""
    workers = start_workers(processes, client, 2, threads=2, FLOW_APP_GATES=str(gates))
    handle = task(client, "three_steps").enqueue(4, pause=pause)
    wait_until(
        (gates / f"{handle.id}.{pause}").exists,
        20,
        f"the job to pause {pause}",
        processes.logs,
    )
    [owner] = [worker for worker in workers if leases_of(client, worker.pid)]
    [heir] = [worker for worker in workers if worker is not owner]
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    (gates / f"{handle.id}.go").touch()

    wait_for_status(client, processes, handle.id, "succeeded")
    info = client.get_job(handle.id)
    assert (info.result, info.attempts) == ((4 * 10 + 1) * 2, 2)
    runs = step_runs(client, handle.id)
    if pause == "between":
        assert {name: [r.pid for r in rows] for name, rows in runs.items()} == {
            "one": [owner.pid],
            "two": [owner.pid],
            "three": [heir.pid],
        }
    else:
        assert {name: [r.pid for r in rows] for name, rows in runs.items()} == {
            "one": [owner.pid],
            "two": [owner.pid, heir.pid],
            "three": [heir.pid],
        }
    assert [(a.attempt, a.outcome) for a in client.get_attempts(handle.id)] == [(1, "lost")]
    assert [(s.name, s.status) for s in client.get_steps(handle.id)] == [
        ("one", "succeeded"),
        ("two", "succeeded"),
        ("three", "succeeded"),
    ]


@pytest.mark.slow
def test_a_sleeping_job_resumes_once_after_the_delay_when_its_worker_was_restarted(
    client: Reliable, processes: Processes
) -> None:
    """``sleeper`` (``concurrency=1``) A sleeps 5 s durably: its thread and its slot are
    freed, so B runs during the sleep. The worker is killed during the sleep and two new
    ones are started: A resumes exactly once (its later step ran once), not before the
    delay, and no attempt was lost (a sleeping job holds no lease)."""
    [first] = start_workers(processes, client, 1)
    sleeper = task(client, "sleeper")
    a = sleeper.enqueue(1, NAP_SECONDS)
    wait_for_status(client, processes, a.id, "sleeping", 20)
    b = sleeper.enqueue(2, 0.0)
    wait_for_status(client, processes, b.id, "succeeded", 20)
    assert client.store.get_status(a.id) == "sleeping"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    start_workers(processes, client, 2)
    wait_for_status(client, processes, a.id, "succeeded")
    info = client.get_job(a.id)
    assert (info.result, info.attempts) == (1, 1)
    assert client.get_attempts(a.id) == []
    runs = step_runs(client, a.id)
    assert {name: len(rows) for name, rows in runs.items()} == {"before": 1, "after": 1}
    assert runs["before"][0].pid == first.pid and runs["after"][0].pid != first.pid
    assert runs["after"][0].at >= runs["before"][0].at + NAP_SECONDS
    # B started and finished while A slept.
    b_runs = step_runs(client, b.id)
    finished_b = client.get_job(b.id).finished_at
    assert finished_b is not None
    assert runs["before"][0].at < b_runs["before"][0].at
    assert finished_b.timestamp() < runs["after"][0].at


@pytest.mark.slow
def test_an_event_sent_from_here_wakes_the_matching_job_waiting_in_a_worker_process(
    client: Reliable, processes: Processes
) -> None:
    """Two jobs wait in a worker process for ``payment.received`` of their own order.
    An event for another order, or with another name, wakes neither; the event for
    order 1, sent from this process, wakes job 1 only, which returns the event's data;
    job 2 waits on until its own event comes."""
    start_workers(processes, client, 1)
    waiter = task(client, "waiter")
    one, two = waiter.enqueue(1), waiter.enqueue(2)
    for handle in (one, two):
        wait_for_status(client, processes, handle.id, "sleeping", 20)

    assert client.send_event("payment.received", {"order_id": 3}) == []
    assert client.send_event("payment.failed", {"order_id": 1}) == []
    paid = {"order_id": 1, "amount": "12.50"}
    assert client.send_event("payment.received", paid) == [one.id]
    wait_for_status(client, processes, one.id, "succeeded", 20)
    assert client.get_job(one.id).result == paid
    assert client.store.get_status(two.id) == "sleeping"

    assert client.send_event("payment.received", {"order_id": 2}) == [two.id]
    wait_for_status(client, processes, two.id, "succeeded", 20)
    assert client.get_job(two.id).result == {"order_id": 2}
