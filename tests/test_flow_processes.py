"""Flow control across real processes: caps are exact, survive kill -9, rate limits hold.

Workers run ``reliable worker tests.apps.flow_app:rel``; every attempt of ``capped`` and
``per_tenant`` writes its start and end times to a file, and the tests compute how many
ran at once. Producers of ``limited`` are the same module run with ``python -m``.
"""

from __future__ import annotations

import bisect
import json
import math
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    Processes,
    count_jobs,
    drop_table,
    jobs_table,
    query,
    start_workers,
    task,
    wait_until,
)

from reliable import Concurrency, Reliable

APP = "tests.apps.flow_app:rel"
# Long enough that no attempt loses its lease on a loaded machine when nothing crashes:
# a takeover of a live attempt would (rightly) let a third one run.
CALM_LEASE = "10"


@pytest.fixture
def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
    with Processes(tmp_path, db_url, app=APP) as started:
        yield started


@pytest.fixture
def client(db_url: str) -> Iterator[Reliable]:
    """The enqueuing side: the flow app's tasks by name, with the same limits (the ones
    given at enqueue are what the store enforces), and a view of the database."""
    app = Reliable(db_url, embedded_worker=False)

    @app.task(name="capped", concurrency=2)
    def capped(n: int, seconds: float = 0.08, gate: str = "") -> int:
        raise AssertionError("runs in the worker processes")

    @app.task(name="per_tenant", concurrency=Concurrency(2, key="arg:tenant"))
    def per_tenant(tenant: str, n: int, seconds: float = 0.08) -> int:
        raise AssertionError("runs in the worker processes")

    yield app
    drop_table(app, "step_runs")  # the flow app's workers create it; PostgreSQL keeps it
    app.close()


@pytest.fixture
def spans_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "spans"
    folder.mkdir()
    return folder


@dataclass(frozen=True)
class Span:
    """One attempt as its worker saw it; ``end`` is ``None`` if its process died first."""

    task: str
    key: str
    job_id: str
    attempt: int
    pid: int
    start: float
    end: float | None


def read_spans(folder: Path) -> list[Span]:
    """Every attempt written to ``folder`` (``<pid>.log`` files of ``start``/``end`` lines)."""
    spans: list[Span] = []
    for path in sorted(folder.glob("*.log")):
        starts: dict[tuple[str, int], tuple[str, str, float]] = {}
        ends: dict[tuple[str, int], float] = {}
        for line in path.read_text().splitlines():
            event, task_name, key, job_id, attempt, at = line.split()
            if event == "start":
                starts[(job_id, int(attempt))] = (task_name, key, float(at))
            else:
                ends[(job_id, int(attempt))] = float(at)
        for (job_id, attempt), (task_name, key, start) in starts.items():
            end = ends.get((job_id, attempt))
            spans.append(Span(task_name, key, job_id, attempt, int(path.stem), start, end))
    return spans


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one that ends as another starts: not both)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = running = 0
    for _, change in events:  # at equal times, -1 sorts first
        running += change
        most = max(most, running)
    return most


def shared_between_processes(spans: list[Span]) -> bool:
    """Whether two processes ran attempts of one key at the same time: only then does
    the count of a cap depend on the database rather than on one worker's bookkeeping."""
    return any(
        a.key == b.key and a.pid != b.pid and a.start < ending(b) and b.start < ending(a)
        for a in spans
        for b in spans
    )


def ending(span: Span) -> float:
    return math.inf if span.end is None else span.end


def describe(spans: list[Span]) -> str:
    origin = min((s.start for s in spans), default=0.0)
    return "\n".join(
        f"{s.task} key={s.key} job={s.job_id} attempt={s.attempt} pid={s.pid} "
        f"{s.start - origin:.3f}..{'-' if s.end is None else f'{s.end - origin:.3f}'}"
        for s in sorted(spans, key=lambda s: s.start)
    )


def enqueue_waves(
    client: Reliable, calls: list[tuple[str, tuple[object, ...]]], wave: int, pause: float
) -> list[str]:
    """Enqueue ``calls`` in waves of ``wave`` jobs, one job every 15 ms, with ``pause``
    seconds after each wave. Within a wave more jobs of a key are due than its cap
    allows (so the cap is reached); the pause lets the slots go idle, so that the next
    wave's jobs are raced for by every worker and slots are held by different processes
    at once (a worker that settles a job claims the next in the same transaction:
    without pauses the first worker would keep the slots for good)."""
    ids = []
    for index, (name, args) in enumerate(calls, start=1):
        ids.append(task(client, name).enqueue(*args).id)
        time.sleep(pause if index % wave == 0 else 0.015)
    return ids


def wait_all_succeeded(client: Reliable, processes: Processes, total: int, timeout: float) -> None:
    wait_until(
        lambda: count_jobs(client, "succeeded") == total,
        timeout,
        f"all {total} jobs to succeed",
        lambda: f"{jobs_table(client)}\n{processes.logs()}",
    )


@pytest.mark.slow
def test_a_global_cap_of_two_is_reached_and_never_exceeded_by_three_processes(
    client: Reliable, processes: Processes, spans_dir: Path
) -> None:
    """``concurrency=2`` across 3 worker processes x 4 threads: at some instant exactly 2
    attempts run (the cap is used), never 3; and at times the 2 ran in two processes."""
    start_workers(
        processes, client, 3, RELIABLE_LEASE_SECONDS=CALM_LEASE, FLOW_APP_SPANS=str(spans_dir)
    )
    calls = [("capped", (n, 0.1)) for n in range(30)]
    ids = enqueue_waves(client, calls, wave=3, pause=0.25)
    wait_all_succeeded(client, processes, len(ids), 30)

    spans = read_spans(spans_dir)
    assert sorted(s.job_id for s in spans) == sorted(ids), describe(spans)  # one attempt each
    assert all(s.end is not None for s in spans)
    overlap = max_overlap([(s.start, s.end) for s in spans if s.end is not None])
    assert overlap == 2, f"max overlap {overlap}\n{describe(spans)}"
    assert shared_between_processes(spans), f"no two processes ran at once\n{describe(spans)}"


@pytest.mark.slow
def test_short_jobs_under_caps_ride_on_held_slots_and_never_exceed_them(
    client: Reliable, processes: Processes, spans_dir: Path
) -> None:
    """Hundreds of short jobs of ``concurrency=2`` and of ``Concurrency(2, key=tenant)``
    drained by 3 worker processes x 4 threads, where workers hand slots on to riders
    and board parked jobs: every cap is reached and never exceeded, each job runs once,
    and every slot is back at the end."""
    tenants = ("acme", "globex", "initech")
    ids = [task(client, "capped").enqueue(n, 0.01).id for n in range(150)]
    ids += [task(client, "per_tenant").enqueue(tenants[n % 3], n, 0.01).id for n in range(150)]
    start_workers(
        processes, client, 3, RELIABLE_LEASE_SECONDS=CALM_LEASE, FLOW_APP_SPANS=str(spans_dir)
    )
    wait_all_succeeded(client, processes, len(ids), 60)

    spans = read_spans(spans_dir)
    assert sorted(s.job_id for s in spans) == sorted(ids), describe(spans)  # once each
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in spans:
        assert s.end is not None
        by_key[s.key].append((s.start, s.end))
    overlaps = {key: max_overlap(intervals) for key, intervals in by_key.items()}
    assert overlaps == dict.fromkeys(("*", *tenants), 2), f"{overlaps}\n{describe(spans)}"
    assert all(slot["in_use"] == 0 for slot in client.flow_state()["concurrency"])


@pytest.mark.slow
def test_a_per_key_cap_of_two_is_reached_and_never_exceeded_for_each_of_three_keys(
    client: Reliable, processes: Processes, spans_dir: Path
) -> None:
    """``Concurrency(2, key="arg:tenant")`` with 3 tenants across 3 worker processes x 4
    threads: for each tenant exactly 2 attempts run at some instant, never 3 (the
    tenants' counts independent of one another, and shared between processes)."""
    start_workers(
        processes, client, 3, RELIABLE_LEASE_SECONDS=CALM_LEASE, FLOW_APP_SPANS=str(spans_dir)
    )
    tenants = ("acme", "globex", "initech")
    # Each wave: three jobs of each tenant in a row.
    calls = [("per_tenant", (tenants[n // 3 % 3], n, 0.15)) for n in range(36)]
    ids = enqueue_waves(client, calls, wave=9, pause=0.3)
    wait_all_succeeded(client, processes, len(ids), 30)

    spans = read_spans(spans_dir)
    assert sorted(s.job_id for s in spans) == sorted(ids), describe(spans)
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in spans:
        assert s.end is not None
        by_key[s.key].append((s.start, s.end))
    overlaps = {key: max_overlap(intervals) for key, intervals in by_key.items()}
    assert overlaps == dict.fromkeys(tenants, 2), f"{overlaps}\n{describe(spans)}"
    # The keys are independent: more than 2 ran at once in all.
    assert max_overlap([i for intervals in by_key.values() for i in intervals]) > 2
    assert shared_between_processes(spans), f"no two processes ran at once\n{describe(spans)}"


@pytest.mark.slow
def test_a_worker_killed_holding_slots_gives_them_back_when_its_leases_expire(
    client: Reliable, processes: Processes, spans_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of a worker running both ``concurrency=2`` attempts: the slots stay taken
    until its leases expire (2 s) - no attempt starts before - then come back, and every
    job completes, the killed ones rerun. Counting each killed attempt as running until
    its lease expired (a fortiori until the kill), at most 2 ran at once; afterwards no
    slot is left in use."""
    spans = str(spans_dir)
    [victim] = start_workers(processes, client, 1, FLOW_APP_SPANS=spans)
    gate = tmp_path / "gate"
    capped = task(client, "capped")
    ids = [capped.enqueue(n, seconds=0.15, gate=str(gate)).id for n in range(6)]
    wait_until(
        lambda: len(read_spans(spans_dir)) == 2,
        20,
        "the victim to start two attempts (and wait at the gate)",
        lambda: f"{jobs_table(client)}\n{processes.logs()}",
    )
    [survivor] = start_workers(processes, client, 1, FLOW_APP_SPANS=spans)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    gate.touch()
    orphaned = {
        row.id: row.lease_expires_at
        for row in query(
            client,
            "SELECT id, lease_expires_at FROM reliable_jobs "
            "WHERE status = 'running' AND lease_owner LIKE :owner",
            owner=f"%:{victim.pid}:%",
        )
    }
    killed = read_spans(spans_dir)
    assert sorted(orphaned) == sorted(s.job_id for s in killed), processes.logs()
    assert all(s.end is None and s.pid == victim.pid for s in killed)

    wait_all_succeeded(client, processes, len(ids), 30)
    assert survivor.poll() is None, processes.logs()
    found = read_spans(spans_dir)
    later = [s for s in found if s.pid == survivor.pid]
    assert len(later) == len(ids) and all(s.end is not None for s in later), describe(found)
    assert min(s.start for s in later) > min(orphaned.values()), describe(found)
    intervals = [(s.start, orphaned[s.job_id] if s.end is None else s.end) for s in found]
    overlap = max_overlap(intervals)
    assert overlap == 2, f"max overlap {overlap}\n{describe(found)}"
    for job_id in orphaned:
        attempts = client.get_attempts(job_id)
        assert [(a.attempt, a.outcome) for a in attempts] == [(1, "lost")]
        assert client.get_job(job_id).attempts == 2
    assert [row["in_use"] for row in client.flow_state()["concurrency"]] == [0]


@pytest.mark.slow
def test_a_rate_limit_holds_across_four_producer_processes_firing_at_once(
    client: Reliable, processes: Processes
) -> None:
    """Four processes enqueue ``limited`` (20/second) as fast as they can for about three
    windows: in every sliding window at most 20 jobs were admitted, about 20 per full
    window were (the limit is used, not a fraction of it), and every refused call left
    nothing behind (the jobs stored are exactly those the producers were told about)."""
    seconds = 3.2
    producers = [processes.producer(str(seconds)) for _ in range(4)]
    policies = [json.loads(reader.next(30, processes.logs)) for _, reader in producers]
    limit, period = policies[0]["limit"], policies[0]["period"]
    assert policies == [{"limit": limit, "period": period}] * 4
    for process, _ in producers:  # each is blocked reading stdin until now
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    reports = [json.loads(reader.next(seconds + 30, processes.logs)) for _, reader in producers]
    for process, _ in producers:
        assert process.wait(timeout=10) == 0, processes.logs()

    accepted = [job_id for report in reports for job_id in report["accepted"]]
    assert sum(report["refused"] for report in reports) > 0, "the limit was never reached"
    rows = query(client, "SELECT id, created_at FROM reliable_jobs ORDER BY created_at")
    assert sorted(row.id for row in rows) == sorted(accepted)
    times = [float(row.created_at) for row in rows]
    # Admitted at ``t`` means fewer than ``limit`` admitted in (t - period, t].
    worst = max(index + 1 - bisect.bisect_right(times, t - period) for index, t in enumerate(times))
    assert worst <= limit, f"{worst} admitted within one period of {period:g}s"
    full = int((times[-1] - times[0]) // period)
    assert full >= 2, f"admissions spanned only {times[-1] - times[0]:.2f}s"
    per_window = [
        bisect.bisect_left(times, times[0] + (k + 1) * period)
        - bisect.bisect_left(times, times[0] + k * period)
        for k in range(full)
    ]
    assert sum(per_window) / full >= 0.8 * limit, per_window
