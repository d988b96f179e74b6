"""A big backlog: claim cost, enqueue rate and a worker's memory beside an empty table.

On SQLite (files in a temporary directory, reliable's default settings) and on
PostgreSQL, two databases side by side, each a fresh schema:

- *empty*: nothing but the jobs the measurements claim;
- *backlog*: the same, plus ``--backlog`` B queued jobs (default 1,000,000; ``--quick``
  100,000) that no claim may take, half of them in another queue (``other``, due now),
  half in the claimed queue but due tomorrow, and B finished jobs (succeeded within the
  last day, so inside the default result TTL). They are written with the raw driver in
  chunks of ``CHUNK`` rows (``executemany`` on SQLite, ``COPY`` on PostgreSQL), then, on
  PostgreSQL, ``VACUUM ANALYZE`` as autovacuum would after such an insert.

Then:

1. **claim cost**: ``Store.claim`` called as a worker's dispatcher calls it (the queues
   and task names of ``Reliable.claimable``, ``limited`` as the application says, the
   lease of its settings) for a batch of ``BATCH`` jobs (4 threads x
   ``PREFETCH_PER_THREAD``), each call also settling, as succeeded, the batch the
   previous call claimed. The two databases take turns in blocks of ``CLAIM_BLOCK``
   calls (ABBA order), so that the shared machine's drift falls on both. Reported: the
   median milliseconds of a call on each, and their ratio (the aim: backlog / empty at
   most 1.5). Then **idle polls**: the same call when no job is due (the claim a worker
   makes while it waits), for information;
2. **enqueue**: ``task.enqueue(i)``, one job per transaction, on each database in turn
   in blocks of 20 (ABBA); the ratio of the rates, backlog / empty (the aim: about 1);
3. **worker memory**: one ``reliable worker bench.apps:rel --threads 4`` process drains
   no-op jobs from the backlog database for ``--minutes`` (default 10; ``--quick`` 1)
   while a producer thread keeps at least ``FEED_LOW`` jobs due with
   ``task.enqueue_many`` batches of up to ``FEED_BATCH``. The worker's resident set
   (``VmRSS`` of ``/proc/<pid>/status``) is read every ``RSS_EVERY`` seconds. Reported:
   the first, the largest and the last reading, and the growth from the reading after
   the first minute (a quarter of the run if shorter) to the last (the aim: under
   10%); and the drain rate over the run, minute by minute.

Run from the repository root::

    python -m bench.backlog                         # bench/results/backlog.json, docs
    python -m bench.backlog --backends postgresql   # one database; the other's figures
                                                    # stay as the last run left them
    python -m bench.backlog --quick                 # bench/results/backlog-quick.json

PostgreSQL comes from ``BENCH_POSTGRES_URL`` (default: the scratch database
``reliable_bench_backlog``); the empty side uses the database of the same name with
``_empty`` appended. Both are created if missing; their ``reliable_*`` tables are
dropped and recreated: never point it at a database whose jobs matter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from reliable.store.records import Outcome

from .apps import build
from .async_jobs import write_docs
from .core import (
    BLOCK,
    FLOOR_BATCH,
    POSTGRES_URL_ENV,
    BenchError,
    Database,
    PostgresDatabase,
    SqliteDatabase,
    check_alive,
    fdatasync_ms,
    payload,
    percentile,
    wait_until_ready,
    worker_process,
)
from .retention import COLUMNS, copy_rows

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MARKER = "bench.backlog"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/reliable_bench_backlog"

DAY = 86400.0
CHUNK = 50_000  # backlog rows per transaction
BATCH = FLOOR_BATCH  # jobs per claim: what a 4-thread worker holds at most
CLAIM_BLOCK = 10  # claim calls per database per turn
WARM_UP = 5  # claim calls per database before the timed ones
IDLE_POLLS = 40  # claim calls per database that find nothing due
ENQUEUE_CHUNK = 10_000  # jobs per enqueue_many while preparing the claims
RSS_EVERY = 5.0  # seconds between readings of the worker's memory
FEED_LOW = 4000  # the producer tops the due jobs up when fewer are left
FEED_BATCH = 1000  # jobs per enqueue_many of the producer
FEED_EVERY = 0.05  # seconds between the producer's looks
STOP_TIMEOUT = 30.0

AIM_CLAIM = 1.5  # backlog / empty, median claim call, at most
AIM_ENQUEUE = 0.9  # backlog / empty enqueue rate, at least
AIM_RSS = 0.10  # growth of the worker's RSS from the first minute to the end, below


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    backlog: int  # queued jobs, and as many finished ones, in the backlog database
    claims: int  # timed claim calls per database
    enqueues: int  # timed enqueues per database
    minutes: float  # the worker's drain


# As many claims in a short run: the jobs they take (about 39,000) are enough for
# PostgreSQL to plan the claim on the empty side as on the big table. On a few thousand
# rows it joins the batch to a sequential scan of the table instead, and the empty side
# comes out slower than the backlog one.
FULL = Sizes(backlog=1_000_000, claims=300, enqueues=2000, minutes=10.0)
QUICK = Sizes(backlog=100_000, claims=300, enqueues=400, minutes=1.0)


# -- the backlog ------------------------------------------------------------------------------


def backlog_rows(count: int, now: float) -> Iterator[list[tuple[Any, ...]]]:
    """``count`` queued jobs no claim of ``default`` may take, then ``count`` finished ones,
    ``CHUNK`` rows at a time, in the columns of ``retention.COLUMNS["jobs"]``.

    Queued: every other one in queue ``other`` (due now), the rest in ``default`` due in
    a day. Finished: succeeded in the last day, one attempt each."""
    chunk: list[tuple[Any, ...]] = []
    for i in range(2 * count):
        if i < count:
            queue, run_at = ("other", now) if i % 2 else ("default", now + DAY)
            done: tuple[Any, ...] = ("queued", payload(i), None, 0, run_at, now, None, None)
        else:
            at = now - DAY + (i - count) * DAY / (2 * count)
            queue, done = "default", ("succeeded", payload(i), "null", 1, at, at, at, at + 0.001)
        chunk.append((uuid.uuid4().hex, "noop", queue, 0, *done, None))  # no idempotency key
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fill_backlog(db: Database, count: int) -> float:
    """Write the backlog into ``db`` with the raw driver; return the seconds it took."""
    table, columns = COLUMNS["jobs"]
    marks = ", ".join("?" for _ in columns.split(","))
    insert = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
    started = time.monotonic()
    connection = db.connect()
    try:
        for rows in backlog_rows(count, time.time()):
            with db.transaction(connection):
                if isinstance(db, PostgresDatabase):
                    copy_rows(connection, table, columns, rows)
                else:
                    connection.executemany(insert, rows)
    finally:
        connection.close()
    vacuum(db)
    return time.monotonic() - started


def vacuum(db: Database) -> None:
    """On PostgreSQL, ``VACUUM ANALYZE`` the jobs: what autovacuum does after big inserts,
    done now so that it does not run in the middle of a measurement."""
    connection = db.connect_autocommit()
    if connection is not None:
        try:
            connection.execute("VACUUM ANALYZE reliable_jobs")
        finally:
            connection.close()


# -- claims and enqueues ----------------------------------------------------------------------


class Claimer:
    """One database's application, claiming from its store as a worker's dispatcher does."""

    def __init__(self, db: Database, jobs: int) -> None:
        self.app = build(db.url)
        noop = self.app.tasks["noop"]
        for start in range(0, jobs, ENQUEUE_CHUNK):
            noop.enqueue_many([(i,) for i in range(start, min(jobs, start + ENQUEUE_CHUNK))])
        self.worker_id = f"bench-backlog-{uuid.uuid4().hex[:8]}"
        self.pending: list[Outcome] = []  # settled by the next call

    def call(self, limit: int) -> tuple[float, int]:
        """One ``Store.claim``: settle the pending outcomes and lease up to ``limit`` jobs.

        Returns the call's milliseconds and the jobs leased; those are succeeded at once,
        their outcomes pending for the next call."""
        app = self.app
        queues, tasks = app.claimable(None, app.runtime.paused())
        limited = app.limited_at_claim()
        now = app.clock.now()
        started = time.perf_counter()
        result = app.store.claim(
            self.worker_id,
            queues,
            limit,
            now,
            app.settings.lease_seconds,
            self.pending,
            tasks=tasks,
            limited=limited,
        )
        spent = (time.perf_counter() - started) * 1000
        finished = app.clock.now()
        self.pending = [
            Outcome(
                job.id,
                job.attempt,
                "succeeded",
                job.started_at,
                finished,
                "null",
                task=job.task,
                limits=job.limits,
            )
            for job in result.jobs
        ]
        return spent, len(result.jobs)

    def close(self) -> None:
        if self.pending:
            self.call(0)
        self.app.close()


def summary(timings: Sequence[float]) -> dict[str, float]:
    """Median, p90 and mean of ``timings`` (ms)."""
    return {
        "median_ms": statistics.median(timings),
        "p90_ms": percentile(timings, 90),
        "mean_ms": statistics.fmean(timings),
    }


def in_turns(rounds: int, block: int) -> Iterator[list[str]]:
    """The order of the two sides for each turn: ABBA, so that drift falls on both."""
    for turn in range(max(2, rounds // block)):
        yield ["empty", "backlog"] if turn % 2 == 0 else ["backlog", "empty"]


def measure_claims(claimers: dict[str, Claimer], rounds: int) -> dict[str, Any]:
    """Full claims of ``BATCH`` jobs, then idle polls, on both sides in turns."""
    for claimer in claimers.values():
        for _ in range(WARM_UP):
            claimer.call(BATCH)
    full: dict[str, list[float]] = {side: [] for side in claimers}
    for order in in_turns(rounds, CLAIM_BLOCK):
        for side in order:
            for _ in range(CLAIM_BLOCK):
                spent, leased = claimers[side].call(BATCH)
                if leased != BATCH:
                    raise BenchError(f"a claim on the {side} side leased {leased} of {BATCH}")
                full[side].append(spent)
    idle: dict[str, list[float]] = {side: [] for side in claimers}
    for claimer in claimers.values():
        claimer.call(0)  # settle the last batch
    for order in in_turns(IDLE_POLLS, CLAIM_BLOCK):
        for side in order:
            for _ in range(CLAIM_BLOCK):
                spent, leased = claimers[side].call(BATCH)
                if leased:
                    raise BenchError(f"an idle poll on the {side} side leased {leased}")
                idle[side].append(spent)
    result: dict[str, Any] = {"batch": BATCH, "calls": len(full["empty"])}
    for name, timings in (("claim", full), ("idle_poll", idle)):
        figures = {side: summary(values) for side, values in timings.items()}
        ratio = figures["backlog"]["median_ms"] / figures["empty"]["median_ms"]
        result[name] = {**figures, "ratio": ratio}
    result["claim"]["aim"] = f"≤ {AIM_CLAIM} x empty"
    result["claim"]["met"] = bool(result["claim"]["ratio"] <= AIM_CLAIM)
    return result


def measure_enqueues(claimers: dict[str, Claimer], count: int) -> dict[str, Any]:
    """``task.enqueue(i)`` rates on both sides, in blocks of ``BLOCK`` (ABBA)."""
    tasks = {side: claimer.app.tasks["noop"] for side, claimer in claimers.items()}
    for task in tasks.values():  # warm-up
        for i in range(BLOCK):
            task.enqueue(i)
    spent = dict.fromkeys(tasks, 0.0)
    done = dict.fromkeys(tasks, 0)
    for order in in_turns(count, BLOCK):
        for side in order:
            started = time.perf_counter()
            for i in range(BLOCK):
                tasks[side].enqueue(i)
            spent[side] += time.perf_counter() - started
            done[side] += BLOCK
    rates = {side: done[side] / spent[side] for side in tasks}
    ratio = rates["backlog"] / rates["empty"]
    return {
        "jobs": done["empty"],
        "empty": rates["empty"],
        "backlog": rates["backlog"],
        "ratio": ratio,
        "aim": f"≈ 1 (≥ {AIM_ENQUEUE})",
        "met": bool(ratio >= AIM_ENQUEUE),
    }


# -- the worker's memory ----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """The resident set of process ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


class Producer:
    """A thread that keeps at least ``FEED_LOW`` no-op jobs due in queue ``default``, with
    ``enqueue_many`` batches. It counts the due jobs with a bounded look (``LIMIT``), as
    the claim reads them, so that the backlog does not make the look itself slow."""

    def __init__(self, db: Database) -> None:
        mark = "?" if isinstance(db, SqliteDatabase) else "%s"
        self.look = (
            "SELECT count(*) FROM (SELECT 1 FROM reliable_jobs"
            " WHERE status IN ('queued', 'sleeping') AND blocked_on IS NULL"
            f" AND queue = 'default' AND run_at <= {mark}"
            f" ORDER BY priority DESC, run_at LIMIT {mark}) AS due"
        )
        self.db = db
        self.app = build(db.url)
        self.fed = 0
        self.lowest: int | None = None  # the fewest due jobs seen since ``watch``
        self.watching = False
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=STOP_TIMEOUT)
        self.app.close()

    def watch(self) -> None:
        """From now on, remember the fewest due jobs seen (the worker is running)."""
        self.watching = True

    def _run(self) -> None:
        noop = self.app.tasks["noop"]
        connection = self.db.connect()
        try:
            while not self.stopped.is_set():
                with self.db.transaction(connection, write=False):
                    row = connection.execute(self.look, (time.time(), FEED_LOW)).fetchone()
                due = int(row[0])
                if self.watching:
                    self.lowest = due if self.lowest is None else min(self.lowest, due)
                if due < FEED_LOW:
                    noop.enqueue_many([(self.fed + i,) for i in range(FEED_BATCH)])
                    self.fed += FEED_BATCH
                else:
                    self.stopped.wait(FEED_EVERY)
        except BaseException as exc:  # reported by the measurement
            self.error = exc
        finally:
            connection.close()


def measure_memory(db: Database, minutes: float, workdir: Path) -> dict[str, Any]:
    """A worker process drains a fed queue for ``minutes``; its RSS read every few seconds."""
    log_path = workdir / f"worker-{db.name}.log"
    samples: list[tuple[float, int]] = []
    with Producer(db) as producer:
        while not producer.fed and producer.error is None:
            time.sleep(0.05)
        with worker_process(db.url, log_path) as process:
            wait_until_ready(db, process, log_path)
            producer.watch()
            started = time.time()
            end = started + minutes * 60
            while True:
                check_alive(process, log_path)
                if producer.error is not None:
                    raise BenchError(f"the producer failed: {producer.error!r}")
                now = time.time()
                samples.append((round(now - started, 1), rss_kib(process.pid)))
                if now >= end:
                    break
                time.sleep(min(RSS_EVERY, end - now))
            ended = time.time()
        lowest = producer.lowest
    return {
        "minutes": minutes,
        **rss_figures(samples, minutes),
        **drained(db, started, ended),
        "fewest_due": lowest,
        "samples": samples,
    }


def rss_figures(samples: list[tuple[float, int]], minutes: float) -> dict[str, Any]:
    """First, largest, last; and the growth from the first reading at or after the first
    minute (a quarter of the run, if it is shorter than four minutes) to the last."""
    settled_at = min(60.0, minutes * 60 / 4)
    baseline = next((kib for at, kib in samples if at >= settled_at), samples[-1][1])
    last = samples[-1][1]
    growth = (last - baseline) / baseline
    return {
        "first_kib": samples[0][1],
        "baseline_at_s": settled_at,
        "baseline_kib": baseline,
        "max_kib": max(kib for _, kib in samples),
        "last_kib": last,
        "growth": growth,
        "aim": f"growth < {AIM_RSS:.0%}",
        "met": bool(growth < AIM_RSS),
    }


def drained(db: Database, started: float, ended: float) -> dict[str, Any]:
    """Jobs that succeeded between ``started`` and ``ended``: per second over the run, and
    per second in each whole minute of it."""
    mark = "?" if isinstance(db, SqliteDatabase) else "%s"
    count = (
        "SELECT count(*) FROM reliable_jobs WHERE status = 'succeeded'"
        f" AND finished_at >= {mark} AND finished_at < {mark}"
    )

    def between(start: float, end: float) -> int:
        return int(db.query(count, (start, end))[0][0])

    minutes = int((ended - started) // 60)
    per_minute = [between(started + 60 * m, started + 60 * (m + 1)) / 60 for m in range(minutes)]
    total = between(started, ended)
    return {
        "drained": total,
        "drain_rate": total / (ended - started),
        "per_minute_rates": per_minute,
    }


# -- a run on one database --------------------------------------------------------------------


def measure(sides: dict[str, Database], sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """Every figure on one database: ``sides`` holds its empty and its backlog instance."""
    for db in sides.values():
        db.reset()
    backlog_db = sides["backlog"]
    name = backlog_db.name
    print(f"{name}: writing a backlog of {sizes.backlog:,} x 2 ...", file=sys.stderr, flush=True)
    fill_seconds = fill_backlog(backlog_db, sizes.backlog)
    jobs = (WARM_UP + max(2, sizes.claims // CLAIM_BLOCK) * CLAIM_BLOCK) * BATCH
    claimers = {side: Claimer(db, jobs) for side, db in sides.items()}
    try:
        for db in sides.values():
            vacuum(db)
        print(f"{name}: claims ...", file=sys.stderr, flush=True)
        claims = measure_claims(claimers, sizes.claims)
        print(f"{name}: enqueues ...", file=sys.stderr, flush=True)
        enqueues = measure_enqueues(claimers, sizes.enqueues)
    finally:
        for claimer in claimers.values():
            claimer.close()
    print(f"{name}: worker memory, {sizes.minutes:g} min ...", file=sys.stderr, flush=True)
    memory = measure_memory(backlog_db, sizes.minutes, workdir)
    backlog_db.reset()  # the scratch database small again
    return {
        "backlog": {"queued": sizes.backlog, "finished": sizes.backlog, "seconds": fill_seconds},
        **claims,
        "enqueue": enqueues,
        "memory": memory,
    }


def databases(backend: str, workdir: Path) -> dict[str, Database]:
    """The empty and the backlog side of ``backend``."""
    if backend == "sqlite":
        return {side: SqliteDatabase(mkdir(workdir / side)) for side in ("empty", "backlog")}
    url = make_url(os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL))
    empty = url.set(database=f"{url.database}_empty").render_as_string(False)
    return {
        "empty": PostgresDatabase(empty),
        "backlog": PostgresDatabase(url.render_as_string(False)),
    }


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- the report -------------------------------------------------------------------------------


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def verdict(met: bool) -> str:
    return "yes" if met else "no"


def rows_of(backend: str, figures: dict[str, Any]) -> list[list[str]]:
    """Table rows: database, measure, empty, backlog, backlog / empty, aim, met."""
    claim, idle, enqueue, memory = (
        figures["claim"],
        figures["idle_poll"],
        figures["enqueue"],
        figures["memory"],
    )
    rss = (
        f"first {mib(memory['first_kib'])}, at {memory['baseline_at_s']:g} s"
        f" {mib(memory['baseline_kib'])}, max {mib(memory['max_kib'])},"
        f" last {mib(memory['last_kib'])}"
    )
    per_minute = memory["per_minute_rates"]
    spread = f" (minutes: {min(per_minute):,.0f}-{max(per_minute):,.0f})" if per_minute else ""
    return [
        [
            backend,
            f"claim of {figures['batch']}, median ms",
            f"{claim['empty']['median_ms']:.2f}",
            f"{claim['backlog']['median_ms']:.2f}",
            f"{claim['ratio']:.2f}",
            claim["aim"],
            verdict(claim["met"]),
        ],
        [
            backend,
            f"claim of {figures['batch']}, p90 ms",
            f"{claim['empty']['p90_ms']:.2f}",
            f"{claim['backlog']['p90_ms']:.2f}",
            f"{claim['backlog']['p90_ms'] / claim['empty']['p90_ms']:.2f}",
            "",
            "",
        ],
        [
            backend,
            "idle poll (none due), median ms",
            f"{idle['empty']['median_ms']:.2f}",
            f"{idle['backlog']['median_ms']:.2f}",
            f"{idle['ratio']:.2f}",
            "",
            "",
        ],
        [
            backend,
            "enqueue, jobs/s",
            f"{enqueue['empty']:,.0f}",
            f"{enqueue['backlog']:,.0f}",
            f"{enqueue['ratio']:.2f}",
            enqueue["aim"],
            verdict(enqueue["met"]),
        ],
        [
            backend,
            f"worker RSS over {memory['minutes']:g} min, MiB",
            "",
            rss,
            f"{1 + memory['growth']:.3f}",
            memory["aim"],
            verdict(memory["met"]),
        ],
        [
            backend,
            "drain while measured, jobs/s",
            "",
            f"{memory['drain_rate']:,.0f}{spread}",
            "",
            "",
            "",
        ],
    ]


HEADER = ["database", "measure", "empty", "backlog", "backlog / empty", "aim", "met"]


def render_text(rows: list[list[str]], header: Sequence[str] = HEADER) -> str:
    """``rows`` under ``header``, as a plain text table."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))
    return "\n".join([head, "-" * len(head), *lines])


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"<!-- {MARKER}:begin (generated by python -m bench.backlog) -->",
        "",
        "## A big backlog",
        "",
        "The issue's aims: with a million queued and a million finished jobs, a claim costs"
        f" at most {AIM_CLAIM} times what it costs on an empty table, an enqueue as much as"
        f" on an empty table, and a worker's memory stays flat over a {FULL.minutes:g}-minute"
        " drain. Two databases side by side, one with nothing but the jobs claimed, one with"
        " B queued jobs no claim may take (half in another queue, half due tomorrow) and B"
        " finished ones, written with the raw driver (`executemany` on SQLite, `COPY` then"
        " `VACUUM ANALYZE` on PostgreSQL). A claim is one `Store.claim` of 128 jobs, called"
        " as the worker calls it, settling the previous batch; the two sides take turns in"
        " blocks of 10 calls. An idle poll is the same call with no job due. The enqueue"
        " is `task.enqueue(i)`, one job per transaction, in turns of 20. The memory is the"
        " `VmRSS` of one `reliable worker --threads 4` process draining no-op jobs from the"
        " backlog database while a producer keeps at least"
        f" {FEED_LOW:,} due (`enqueue_many` batches of {FEED_BATCH:,}), read every"
        f" {RSS_EVERY:g} s; the ratio is the last reading over the one after the first"
        " minute. The method is in the module's docstring (bench/backlog.py);"
        " bench/results/backlog.json holds every sample.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|--:|--:|--:|---|---|",
    ]
    for backend, figures in report["results"].items():
        lines += ["| " + " | ".join(row) + " |" for row in rows_of(backend, figures)]
    idle = ", ".join(
        f"{figures['idle_poll']['backlog']['median_ms']:.1f} ms on {backend}"
        f" ({figures['idle_poll']['empty']['median_ms']:.2f} ms empty)"
        for backend, figures in report["results"].items()
    )
    lines += [
        "",
        "A claim that finds a full batch stops at its 128th job, backlog or not. A claim"
        " that finds fewer due jobs than it asks for (an idle poll, or the last claims of"
        " a queue running dry) reads, through the due index, every queued job of its"
        " queue that is not due yet: the index is searched on the queue alone (priority"
        " comes before `run_at` in it), so `run_at <= now` is checked entry by entry."
        " Jobs of other queues cost nothing. With half the backlog due tomorrow in the"
        f" claimed queue such a claim took {idle}.",
        "",
    ]
    for backend, figures in report["results"].items():
        run = figures["run"]
        machine = run["machine"]
        fill = figures["backlog"]
        lines.append(
            f"{backend}: B = {fill['queued']:,}, written in {fill['seconds']:.0f} s;"
            f" {figures['calls']} timed claims per side; measured {run['date']} with"
            f" `{run['command']}` on {machine['cpus']} cores ({machine['platform']}, Python"
            f" {machine['python']}), {database_line(machine['database'])}, fdatasync p50"
            f" {machine['fdatasync_ms']['p50']:.2f} ms, one-minute load average"
            f" {machine['load_average_before']} before and {machine['load_average_after']}"
            " after. The producer's bounded look saw at least"
            f" {figures['memory']['fewest_due']} jobs due while the worker ran."
        )
        lines.append("")
    lines.append(f"<!-- {MARKER}:end -->")
    return "\n".join(lines) + "\n"


def database_line(described: dict[str, str]) -> str:
    if "sqlite_version" in described:
        return f"SQLite {described['sqlite_version']} (WAL, synchronous={described['synchronous']})"
    return (
        f"PostgreSQL {described.get('server_version', '?')} on the same machine"
        f" (synchronous_commit={described.get('synchronous_commit', '?')})"
    )


def merged(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``report``, with the figures of databases this run left out taken from ``out``."""
    if out.exists():
        previous = json.loads(out.read_text()).get("results", {})
        kept = dict(previous)
        kept.update(report["results"])
        order = ["SQLite", "PostgreSQL"]
        report["results"] = {name: kept[name] for name in order if name in kept}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run; docs untouched")
    parser.add_argument("--backlog", type=int, help="queued (and finished) jobs of the backlog")
    parser.add_argument("--minutes", type=float, help="length of the worker's drain")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql"
    )
    parser.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.backlog is not None:
        sizes = Sizes(args.backlog, sizes.claims, sizes.enqueues, sizes.minutes)
    if args.minutes is not None:
        sizes = Sizes(sizes.backlog, sizes.claims, sizes.enqueues, args.minutes)
    backends = [name.strip().lower() for name in args.backends.split(",") if name.strip()]
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python -m bench.backlog {shown}".strip()
    report: dict[str, Any] = {"sizes": asdict(sizes), "results": {}}
    with tempfile.TemporaryDirectory(prefix="reliable-bench-backlog-") as scratch:
        workdir = Path(scratch)
        for backend in backends:
            sides = databases(backend, workdir)
            machine: dict[str, Any] = {
                "cpus": os.cpu_count(),
                "platform": platform.platform(terse=True),
                "python": platform.python_version(),
                "fdatasync_ms": fdatasync_ms(workdir),
                "load_average_before": round(os.getloadavg()[0], 2),
            }
            figures = measure(sides, sizes, workdir)
            machine["load_average_after"] = round(os.getloadavg()[0], 2)
            machine["database"] = sides["backlog"].describe()
            figures["run"] = {
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                "command": command,
                "sizes": asdict(sizes),
                "machine": machine,
            }
            report["results"][sides["backlog"].name] = figures
    rows = [row for name, f in report["results"].items() for row in rows_of(name, f)]
    print(render_text(rows))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / ("backlog-quick.json" if args.quick else "backlog.json")
    report = merged(out, report)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if not args.quick and not args.no_docs:
        write_docs(render_markdown(report), MARKER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
