"""The chaos soak: worker processes killed at random and the database restarted under load.

``run_soak(plan, ...)`` starts ``plan.workers`` processes of ``reliable worker
tests.apps.soak_app:rel``, measures the wake-up latency of idle workers, enqueues
``plan.jobs`` jobs of three steps (a tenth of them on one account capped at 2) while a
killer SIGKILLs a random worker every few seconds and starts another in its place and,
on PostgreSQL, the server is restarted; once every job has ended it measures the
latency again and checks, from the records the jobs wrote outside the store
(``tests/apps/soak_app.py``) and from the store:

- no job lost: every enqueued job exists once and succeeded, with the tokens its
  steps stored as its result;
- no completed step run again: for each stored step, exactly one execution carries
  the stored token, and no execution of it began after it was stored (executions
  before, cut short by a kill, are allowed: at-least-once for the step in progress);
- the cap held: per account, attempts running at once (an attempt killed mid-way
  counted until its lease was taken over) never more than 2;
- the workers went on by themselves after each restart, and listen again.

It returns a ``SoakReport``; the tests assert on it and print it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from support import Processes, query, wait_until

from reliable import Concurrency, Reliable, StoreError
from reliable.serialization import loads

APP = "tests.apps.soak_app:rel"
CAP = 2
HOT_ACCOUNT = "hot"
ACCOUNTS = 40  # besides the hot one; capped too, at 2 each
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class SoakPlan:
    """What one soak does. Fractions are of the jobs enqueued so far."""

    jobs: int
    workers: int = 3
    threads: int = 4
    kill_every: tuple[float, float] = (2.0, 5.0)
    kills_until: float = 1.0  # the killer stops once this fraction is enqueued
    restarts_at: tuple[float, ...] = ()  # PostgreSQL restarts, under load
    produce_seconds: float = 30.0  # enqueues are spread over this long
    probes: int = 5  # wake-up latency samples, before and after
    lease_seconds: float = 3.0
    poll_seconds: float = 5.0
    step_seconds: float = 0.005  # per step; the hot account's steps take ten times as long
    hang_seconds: float = 600.0  # bounds a hang, never a measurement


@dataclass
class Restart:
    """One restart of PostgreSQL: begun, accepting connections again; how many workers
    lived through it and how many of those ran something after it."""

    at: float
    ready: float
    mode: str
    survivors: int = 0
    went_on: int = 0


@dataclass
class SoakReport:
    backend: str
    jobs: int
    workers: int
    threads: int
    seconds: float = 0.0
    kills: int = 0
    restarts: list[Restart] = field(default_factory=list)
    restart_skipped: str | None = None
    enqueue_retries: int = 0
    worker_start_failures: int = 0
    jobs_lost: int = 0
    jobs_not_succeeded: int = 0
    duplicate_jobs: int = 0
    attempts_lost: int = 0
    steps_stored: int = 0
    step_executions: int = 0
    steps_rerun_before_stored: int = 0
    steps_run_after_stored: int = 0
    steps_without_execution: int = 0
    results_wrong: int = 0
    max_overlap_hot: int = 0
    max_overlap_any: int = 0
    spans_unaccounted: int = 0
    latency_before_ms: list[float] = field(default_factory=list)
    latency_after_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        for when in ("before", "after"):
            samples = data[f"latency_{when}_ms"]
            if samples:
                data[f"latency_{when}_median_ms"] = round(median(samples), 2)
                data[f"latency_{when}_max_ms"] = round(max(samples), 2)
        data["problems"] = data["problems"][:20]
        return data

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=2) + "\n")


# -- PostgreSQL restarts ---------------------------------------------------------------


def restart_command(url: str) -> list[str] | str:
    """The command that restarts the local cluster serving ``url``, or why there is none."""
    parsed = make_url(url)
    if parsed.host not in ("127.0.0.1", "localhost", "::1"):
        return f"the server {parsed.host} is not on this machine"
    lister, control = shutil.which("pg_lsclusters"), shutil.which("pg_ctlcluster")
    if lister is None or control is None:
        return "pg_lsclusters/pg_ctlcluster (postgresql-common) are not installed"
    listed = subprocess.run([lister, "--no-header"], capture_output=True, text=True, check=False)
    port = str(parsed.port or 5432)
    for line in listed.stdout.splitlines():
        version, cluster, cluster_port, *_ = line.split()
        if cluster_port == port:
            return [control, "--skip-systemctl-redirect", version, cluster, "restart"]
    return f"no local cluster listens on port {port}"


def restart_postgres(command: list[str], url: str, mode: str) -> Restart:
    """Restart the server (``fast``: sessions ended; ``immediate``: a crash, recovered
    from the WAL on start) and wait until it accepts connections again."""
    began = time.time()
    done = subprocess.run([*command, "-m", mode], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"restarting PostgreSQL failed: {done.stdout}{done.stderr}")
    wait_for_postgres(url, 60)
    return Restart(began, time.time(), mode)


def wait_for_postgres(url: str, timeout: float) -> None:
    """Until the server accepts connections (``pg_isready``, else a connection)."""
    parsed = make_url(url)
    ready = shutil.which("pg_isready")
    deadline = time.monotonic() + timeout
    while not postgres_ready(parsed, ready):
        if time.monotonic() > deadline:
            pytest.fail(f"PostgreSQL did not come back within {timeout:g}s")
        time.sleep(0.1)


def postgres_ready(url: URL, pg_isready: str | None) -> bool:
    if pg_isready is not None:
        args = [pg_isready, "-q", "-h", str(url.host), "-p", str(url.port or 5432)]
        return subprocess.run(args, check=False).returncode == 0
    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


def listening(url: str, names: list[str]) -> set[str]:
    """Which of the application names hold a session that LISTENs for new jobs."""
    admin = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with admin.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN %' AND application_name = ANY(:names)"
                ),
                {"names": names},
            )
            return {row.application_name for row in rows}
    except Exception:  # the server may be coming back: nobody listens yet
        return set()
    finally:
        admin.dispose()


# -- the worker processes --------------------------------------------------------------


@dataclass
class Member:
    """One worker process of the crew: when it started and, if it was, when killed."""

    process: subprocess.Popen[str]
    name: str
    started: float
    killed: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class Crew:
    """The worker processes: one per slot, replaced when killed. On PostgreSQL each has
    an ``application_name`` of its own, so the server says which of them listen."""

    def __init__(
        self, processes: Processes, client: Reliable, plan: SoakPlan, url: str, records: Path
    ) -> None:
        self.processes = processes
        self.client = client
        self.failed_starts = 0
        self.plan = plan
        self.url = url
        self.records = records
        self.postgres = url.startswith("postgresql")
        self.slots: list[Member] = []
        self.history: list[Member] = []
        self.lock = threading.Lock()

    def start(self) -> Member:
        """Start one worker and wait until it has announced itself; one that exits
        first (it could not open the database: the server is restarting) is started
        again, as a supervisor would."""
        deadline = time.monotonic() + 120
        while True:
            member = self.spawn()
            while member.pid not in heartbeats_after(self.client, 0.0):
                if member.process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if member.process.poll() is None:
                return member
            self.failed_starts += 1
            if time.monotonic() > deadline:
                pytest.fail(f"a worker would not start\n{self.processes.logs()}")
            time.sleep(0.5)

    def spawn(self) -> Member:
        name = f"soak-worker-{len(self.history) + 1}"
        url = self.url
        if self.postgres:
            url = (
                make_url(url)
                .update_query_dict({"application_name": name})
                .render_as_string(hide_password=False)
            )
        process = self.processes.worker(
            "--threads",
            str(self.plan.threads),
            RELIABLE_DATABASE_URL=url,
            RELIABLE_LEASE_SECONDS=str(self.plan.lease_seconds),
            RELIABLE_POLL_INTERVAL=str(self.plan.poll_seconds),
            SOAK_APP_RECORDS=str(self.records),
        )
        member = Member(process, name, time.time())
        self.history.append(member)
        return member

    def start_all(self) -> None:
        with self.lock:
            self.slots = [self.spawn() for _ in range(self.plan.workers)]
        self.wait_ready(self.slots)

    def members(self) -> list[Member]:
        with self.lock:
            return list(self.slots)

    def wait_ready(self, members: list[Member], since: float = 0.0) -> None:
        """Until ``members`` have announced themselves (a heartbeat after ``since``) and,
        on PostgreSQL, LISTEN."""
        pids = {member.pid for member in members}
        names = {member.name for member in members}
        wait_until(
            lambda: pids <= heartbeats_after(self.client, since),
            60,
            "the workers to announce themselves",
            self.processes.logs,
        )
        if self.postgres:
            wait_until(
                lambda: listening(self.url, sorted(names)) == names,
                60,
                "every worker to LISTEN",
                self.processes.logs,
            )

    def kill_one(self) -> None:
        with self.lock:
            index = random.randrange(len(self.slots))
            victim = self.slots[index]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=30)
        victim.killed = time.time()
        replacement = self.start()
        with self.lock:
            self.slots[index] = replacement

    def kills(self) -> int:
        return sum(member.killed is not None for member in self.history)

    def alive(self) -> bool:
        return all(member.process.poll() is None for member in self.members())


def heartbeats_after(client: Reliable, since: float) -> set[int]:
    """Pids of the workers whose last heartbeat came after ``since`` (none while the
    server restarts and refuses connections: the caller asks again, as a supervisor)."""
    try:
        rows = query(client, "SELECT pid FROM reliable_workers WHERE heartbeat_at > :t", t=since)
    except OperationalError:
        return set()
    return {row.pid for row in rows}


class Killer:
    """A thread that kills a random worker every ``plan.kill_every`` seconds, and starts
    another in its place, until stopped."""

    def __init__(self, crew: Crew) -> None:
        self.crew = crew
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="soak-killer", daemon=True)

    def _run(self) -> None:
        try:
            while not self.stopped.wait(random.uniform(*self.crew.plan.kill_every)):
                self.crew.kill_one()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error


# -- records written by the jobs -------------------------------------------------------


@dataclass
class Records:
    """What the jobs wrote outside the store (see ``tests/apps/soak_app.py``)."""

    steps: dict[tuple[str, str], list[tuple[int, int, str, float]]]
    spans: dict[tuple[str, int], tuple[str, float, float | None]]
    probes: dict[str, tuple[int, float]]

    @classmethod
    def read(cls, folder: Path) -> Records:
        steps: dict[tuple[str, str], list[tuple[int, int, str, float]]] = defaultdict(list)
        starts: dict[tuple[str, int], tuple[str, float]] = {}
        ends: dict[tuple[str, int], float] = {}
        probes: dict[str, tuple[int, float]] = {}
        for path in sorted(folder.glob("*.log")):
            for line in path.read_text().splitlines():
                kind, *fields = line.split()
                if kind == "step":
                    job, name, attempt, pid, token, at = fields
                    steps[(job, name)].append((int(attempt), int(pid), token, float(at)))
                elif kind == "start":
                    job, attempt, account, at = fields
                    starts[(job, int(attempt))] = (account, float(at))
                elif kind == "end":
                    job, attempt, account, at = fields
                    ends[(job, int(attempt))] = float(at)
                elif kind == "probe":
                    job, pid, at = fields
                    probes.setdefault(job, (int(pid), float(at)))
        spans = {key: (account, start, ends.get(key)) for key, (account, start) in starts.items()}
        return cls(dict(steps), spans, probes)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (one that ends as another starts: not both)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = running = 0
    for _, change in events:  # at equal times, -1 sorts first
        running += change
        most = max(most, running)
    return most


# -- the soak --------------------------------------------------------------------------


def client_for(url: str) -> Reliable:
    """The enqueuing side: the soak app's tasks by name, with the same limits."""
    client = Reliable(url, embedded_worker=False)

    @client.task(name="soak_job", concurrency=Concurrency(CAP, key="arg:account"))
    def soak_job(n: int, account: str, seconds: float = 0.005) -> list[str]:
        raise AssertionError("runs in the worker processes")

    @client.task(name="probe")
    def probe(n: int) -> int:
        raise AssertionError("runs in the worker processes")

    return client


def account_of(n: int) -> str:
    """A tenth of the jobs are the hot account's, five in a row: bursts that its cap
    holds back while the other accounts' jobs go by."""
    return HOT_ACCOUNT if n % 50 < 5 else f"account-{n % ACCOUNTS}"


def retrying(call: Callable[[], Any], report: SoakReport, hang: float) -> Any:
    """``call()`` until the database answers (it may be restarting); bounded by ``hang``."""
    deadline = time.monotonic() + hang
    while True:
        try:
            return call()
        except StoreError:
            report.enqueue_retries += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.05, 0.25))


def unfinished(client: Reliable) -> int:
    sql = (
        "SELECT count(*) AS n FROM reliable_jobs "
        "WHERE status NOT IN ('succeeded', 'failed', 'cancelled')"
    )
    return int(query(client, sql)[0].n)


def measure_latency(
    client: Reliable, crew: Crew, records: Path, report: SoakReport, count: int
) -> list[float]:
    """Wake-up latency of idle workers, in ms: from the enqueue call (committed when it
    returns) to the start of the attempt, as the attempt recorded it."""
    probe = client.tasks["probe"]
    samples = []
    for n in range(count):
        wait_until(
            lambda: unfinished(client) == 0, 120, "the workers to be idle", crew.processes.logs
        )
        time.sleep(0.3)  # every dispatcher back to waiting
        before = time.time()
        handle = retrying(lambda n=n: probe.enqueue(n), report, 60)
        wait_until(
            lambda job_id=handle.id: job_id in Records.read(records).probes,
            60,
            f"probe {handle.id} to start",
            crew.processes.logs,
        )
        _, at = Records.read(records).probes[handle.id]
        samples.append(round((at - before) * 1000, 2))
    return samples


def run_soak(
    plan: SoakPlan, url: str, directory: Path, *, restart: list[str] | str | None = None
) -> SoakReport:
    """Run ``plan`` against ``url``; ``restart`` is the command that restarts PostgreSQL
    (or why there is none, or ``None`` on SQLite)."""
    backend = "postgresql" if url.startswith("postgresql") else "sqlite"
    report = SoakReport(backend, plan.jobs, plan.workers, plan.threads)
    if isinstance(restart, str):
        report.restart_skipped = restart
    records = directory / "records"
    records.mkdir()
    client = client_for(url)
    began = time.time()
    with Processes(directory, url, app=APP, lease_seconds=plan.lease_seconds) as processes:
        crew = Crew(processes, client, plan, url, records)
        try:
            crew.start_all()
            report.latency_before_ms = measure_latency(client, crew, records, report, plan.probes)
            ids = produce_under_chaos(plan, url, client, crew, report, restart)
            wait_until(
                lambda: unfinished(client) == 0,
                plan.hang_seconds,
                "every job to end",
                lambda: f"{query(client, JOB_COUNTS)}\n{processes.logs()}",
            )
            survivors = []
            if report.restarts:
                # Those that lived through the last restart renew their leases and
                # LISTEN again by themselves; the probes then run in them.
                last = report.restarts[-1]
                survivors = [m for m in crew.members() if m.started < last.at]
                crew.wait_ready(survivors, since=last.ready)
            report.latency_after_ms = measure_latency(client, crew, records, report, plan.probes)
            report.seconds = round(time.time() - began, 1)
            report.kills = crew.kills()
            report.worker_start_failures = crew.failed_starts
            if not crew.alive():
                report.problems.append("a worker died that was not killed")
            found = Records.read(records)
            went_on(report, crew, found)
            if survivors and len(survivors) == plan.workers:
                last = report.restarts[-1]
                after = {pid for pid, at in found.probes.values() if at > last.ready}
                if not after <= {m.pid for m in survivors}:
                    report.problems.append("a probe after the last restart ran in a new worker")
            check(client, ids, found, report)
        finally:
            if backend == "postgresql":
                wait_for_postgres(url, 60)
            client.close()
        if report.problems:
            report.problems.append(processes.logs()[-4000:])
    return report


JOB_COUNTS = "SELECT task, status, count(*) AS n FROM reliable_jobs GROUP BY task, status"


def went_on(report: SoakReport, crew: Crew, found: Records) -> None:
    """For each restart: how many workers lived through it, and how many of those ran a
    step or a probe after it (by themselves: nothing restarted them)."""
    activity: dict[int, float] = defaultdict(float)
    for runs in found.steps.values():
        for _, pid, _, at in runs:
            activity[pid] = max(activity[pid], at)
    for pid, at in found.probes.values():
        activity[pid] = max(activity[pid], at)
    for restart in report.restarts:
        lived = [
            m
            for m in crew.history
            if m.started < restart.at and (m.killed is None or m.killed > restart.ready)
        ]
        restart.survivors = len(lived)
        restart.went_on = sum(activity.get(m.pid, 0.0) > restart.ready for m in lived)


def produce_under_chaos(
    plan: SoakPlan,
    url: str,
    client: Reliable,
    crew: Crew,
    report: SoakReport,
    restart: list[str] | str | None,
) -> list[str]:
    """Enqueue ``plan.jobs`` jobs at an even pace while the killer and the restarts run;
    the ids, in order. Every enqueue carries an idempotency key, so one that failed
    while the server restarted can be made again without a second job."""
    soak_job = client.tasks["soak_job"]
    killer = Killer(crew)
    planned = sorted(plan.restarts_at) if isinstance(restart, list) else []
    pending = list(planned)
    restarts: list[threading.Thread] = []
    ids: list[str] = []
    started = time.monotonic()
    killer.start()
    try:
        for n in range(plan.jobs):
            done = n / plan.jobs
            if done >= plan.kills_until:
                killer.stop()
            if pending and done >= pending[0] and isinstance(restart, list):
                pending.pop(0)
                for thread in restarts:
                    thread.join()  # one at a time
                mode = RESTART_MODES[len(restarts) % len(RESTART_MODES)]
                thread = threading.Thread(
                    target=lambda command=restart, mode=mode: report.restarts.append(
                        restart_postgres(command, url, mode)
                    ),
                    daemon=True,
                )
                thread.start()
                restarts.append(thread)
            due = started + plan.produce_seconds * done
            if (pause := due - time.monotonic()) > 0:
                time.sleep(pause)
            handle = retrying(
                lambda n=n: soak_job.enqueue(
                    n,
                    account_of(n),
                    plan.step_seconds * (10 if account_of(n) == HOT_ACCOUNT else 1),
                    idempotency_key=f"soak-{n}",
                ),
                report,
                plan.hang_seconds,
            )
            ids.append(handle.id)
    finally:
        killer.stop()
        for thread in restarts:
            thread.join(timeout=120)
    if len(report.restarts) != len(planned):
        pytest.fail(f"{len(planned) - len(report.restarts)} restarts of PostgreSQL did not end")
    return ids


# A crash first (no shutdown checkpoint: recovery from the WAL), then a clean restart.
RESTART_MODES = ("immediate", "fast")


def check(client: Reliable, ids: list[str], found: Records, report: SoakReport) -> None:
    """Fill ``report`` with what the store and the records say (see the module)."""
    jobs = {
        row.id: row
        for row in query(
            client, "SELECT id, status, result FROM reliable_jobs WHERE task = 'soak_job'"
        )
    }
    report.duplicate_jobs = len(jobs) - len(set(ids))
    report.jobs_lost = sum(job_id not in jobs for job_id in ids)
    report.jobs_not_succeeded = sum(
        job_id in jobs and jobs[job_id].status != "succeeded" for job_id in ids
    )
    stored = {
        (row.job_id, row.name): row
        for row in query(
            client, "SELECT job_id, name, status, result, finished_at FROM reliable_steps"
        )
        if row.job_id in jobs
    }
    report.steps_stored = sum(row.status == "succeeded" for row in stored.values())
    report.step_executions = sum(len(runs) for runs in found.steps.values())
    tokens: dict[str, dict[str, str]] = defaultdict(dict)
    for (job_id, name), row in stored.items():
        if row.status != "succeeded":
            continue
        token = loads(row.result)
        tokens[job_id][name] = token
        runs = found.steps.get((job_id, name), [])
        completing = [run for run in runs if run[2] == token]
        if len(completing) != 1:
            report.steps_without_execution += 1
            report.problems.append(f"step {job_id}/{name}: {len(completing)} runs stored it")
            continue
        for run in runs:
            if run is completing[0]:
                continue
            if run[3] > row.finished_at:
                report.steps_run_after_stored += 1
                report.problems.append(
                    f"step {job_id}/{name} stored at {row.finished_at:.6f} by attempt "
                    f"{completing[0][0]} (pid {completing[0][1]}) ran again in attempt "
                    f"{run[0]} (pid {run[1]}) at {run[3]:.6f}"
                )
            else:
                report.steps_rerun_before_stored += 1
    for job_id in ids:
        job = jobs.get(job_id)
        if job is None or job.status != "succeeded":
            continue
        expected = [tokens[job_id].get(name) for name in ("one", "two", "three")]
        if loads(job.result) != expected:
            report.results_wrong += 1
            report.problems.append(f"job {job_id}: result {job.result} != steps {expected}")
    lost = {
        (row.job_id, row.attempt): row.finished_at
        for row in query(
            client,
            "SELECT job_id, attempt, finished_at FROM reliable_attempts WHERE outcome = 'lost'",
        )
    }
    report.attempts_lost = len(lost)
    by_account: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (job_id, attempt), (account, start, end) in found.spans.items():
        if end is None:
            # Killed mid-way: its slot was held until the attempt was taken over.
            end = lost.get((job_id, attempt))
        if end is None:
            report.spans_unaccounted += 1
            report.problems.append(f"attempt {attempt} of {job_id} never ended and was not lost")
            end = math.inf
        by_account[account].append((start, end))
    overlaps = {account: max_overlap(spans) for account, spans in by_account.items()}
    report.max_overlap_hot = overlaps.get(HOT_ACCOUNT, 0)
    report.max_overlap_any = max(overlaps.values(), default=0)
