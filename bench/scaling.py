"""Scaling out: the drain rate of 1, 2 and 3 worker processes on one database.

On PostgreSQL (``BENCH_POSTGRES_URL``, default the scratch database
``reliable_bench_scaling``, created if missing, its ``reliable_*`` tables dropped and
recreated) with 1, 2 and 3 ``reliable worker bench.apps:rel --threads 4`` processes,
and on SQLite (a file in a temporary directory, reliable's default settings) with 1 and
2, for information. Each drain:

1. a fresh schema; the processes are started together and waited for until each one
   can be woken by a commit (on PostgreSQL: its ``LISTEN`` is in place; on SQLite: it
   has registered in ``reliable_workers``);
2. ``--jobs`` N no-op jobs (default 30,000; ``--quick`` 5,000) are queued with one
   ``task.enqueue_many`` (one transaction: they become due together, and its commit
   wakes every worker);
3. the rate is N over the time from the first attempt's start to the last job's finish,
   read from the jobs' own ``started_at`` and ``finished_at``.

Each count of processes is drained ``--rounds`` times (default 3; ``--quick`` 1), the
counts in turn (1, 2, 3, then 3, 2, 1, ...) so that drift in the machine's load falls on
all of them; the medians are reported, with their ratio to one process (the aim on
PostgreSQL: 3 processes at least 2 x one). During each drain (from the commit of the
``enqueue_many`` to the look that found every job finished, ``LOOK_EVERY`` apart) the
machine's CPU use (``/proc/stat``, all processes: the workers, the database server,
this script, anything else running) and the worker processes' own CPU time
(``/proc/<pid>/stat``) are read, to show whether the cores were the bound.

Run from the repository root::

    python -m bench.scaling            # bench/results/scaling.json and docs/benchmarks.md
    python -m bench.scaling --quick    # bench/results/scaling-quick.json only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .apps import build
from .async_jobs import write_docs
from .backlog import render_text
from .core import (
    POSTGRES_URL_ENV,
    THREADS,
    BenchError,
    Database,
    PostgresDatabase,
    SqliteDatabase,
    check_alive,
    fdatasync_ms,
    worker_process,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MARKER = "bench.scaling"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/reliable_bench_scaling"

PROCESSES = {"PostgreSQL": (1, 2, 3), "SQLite": (1, 2)}
AIM_PROCESSES = 3  # on PostgreSQL, this many processes ...
AIM_RATIO = 2.0  # ... drain at least this many times as fast as one
READY_TIMEOUT = 60.0
SETTLE_SECONDS = 0.5  # after every worker is ready, before the jobs are queued
LOOK_EVERY = 0.2  # seconds between looks for the end of a drain
TICKS = os.sysconf("SC_CLK_TCK")


def ready_workers(db: Database) -> int:
    """How many worker processes a commit would wake now."""
    if isinstance(db, PostgresDatabase):
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE %s"
        )
        return int(db.query(sql, ("LISTEN %",))[0][0])
    return int(db.query("SELECT count(*) FROM reliable_workers")[0][0])


def machine_ticks() -> tuple[int, int]:
    """Busy and total CPU ticks of the whole machine, from ``/proc/stat``."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # user .. steal (guest time is counted in user already)
    return total - idle, total


def process_ticks(pid: int) -> int:
    """User and system CPU ticks of process ``pid``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def drain(db: Database, processes: int, jobs: int, workdir: Path, tag: str) -> dict[str, float]:
    """One drain of ``jobs`` no-op jobs by ``processes`` worker processes."""
    db.reset()
    app = build(db.url)
    noop = app.tasks["noop"]
    calls = [(i,) for i in range(jobs)]
    try:
        with ExitStack() as stack:
            started: list[tuple[subprocess.Popen[bytes], Path]] = []
            for k in range(processes):
                log_path = workdir / f"{tag}-{k}.log"
                started.append((stack.enter_context(worker_process(db.url, log_path)), log_path))
            deadline = time.monotonic() + READY_TIMEOUT
            while ready_workers(db) < processes:
                for process, log_path in started:
                    check_alive(process, log_path)
                if time.monotonic() > deadline:
                    raise BenchError(f"{processes} workers not ready after {READY_TIMEOUT:g}s")
                time.sleep(0.05)
            time.sleep(SETTLE_SECONDS)
            noop.enqueue_many(calls)  # the drain starts at its commit
            busy0, total0 = machine_ticks()
            own0 = sum(process_ticks(process.pid) for process, _ in started)
            wall0 = time.monotonic()
            deadline = time.monotonic() + max(120.0, jobs / 50)
            while db.unfinished():
                for process, log_path in started:
                    check_alive(process, log_path)
                if time.monotonic() > deadline:
                    raise BenchError(f"drain unfinished after its time limit: {db.counts()}")
                time.sleep(LOOK_EVERY)
            wall = time.monotonic() - wall0
            busy1, total1 = machine_ticks()
            own1 = sum(process_ticks(process.pid) for process, _ in started)
    finally:
        app.close()
    succeeded, seconds = db.drain_span()
    if succeeded != jobs:
        raise BenchError(f"{jobs - succeeded} of {jobs} jobs did not succeed: {db.counts()}")
    return {
        "rate": jobs / seconds,
        "seconds": seconds,
        "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
        "worker_cores": (own1 - own0) / TICKS / wall,
    }


def measure(db: Database, counts: Sequence[int], jobs: int, rounds: int, workdir: Path) -> Any:
    """Every count of processes, ``rounds`` times, in turns (ABBA); medians and ratios."""
    runs: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
    for turn in range(rounds):
        order = list(counts) if turn % 2 == 0 else list(reversed(counts))
        for count in order:
            print(f"{db.name}: {count} process(es), round {turn + 1} ...", file=sys.stderr)
            runs[count].append(drain(db, count, jobs, workdir, f"{db.name}-{count}-{turn}"))
    figures: dict[str, Any] = {}
    for count, each in runs.items():
        figures[str(count)] = {
            "rate": statistics.median(run["rate"] for run in each),
            "machine_busy": statistics.median(run["machine_busy"] for run in each),
            "worker_cores": statistics.median(run["worker_cores"] for run in each),
            "runs": each,
        }
    one = figures[str(counts[0])]["rate"]
    for value in figures.values():
        value["ratio"] = value["rate"] / one
    return {"jobs": jobs, "rounds": rounds, "threads": THREADS, "processes": figures}


def aim_met(results: dict[str, Any]) -> bool | None:
    """Whether ``AIM_PROCESSES`` processes on PostgreSQL reached ``AIM_RATIO`` x one."""
    figures = results.get("PostgreSQL", {}).get("processes", {}).get(str(AIM_PROCESSES))
    return None if figures is None else bool(figures["ratio"] >= AIM_RATIO)


HEADER = [
    "database",
    "processes",
    "jobs/s (median)",
    "x one",
    "machine CPU busy",
    "workers' CPU, cores",
    "aim",
    "met",
]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    met = report["aim"]["met"]
    for backend, result in report["results"].items():
        for count, figures in result["processes"].items():
            rates = [run["rate"] for run in figures["runs"]]
            spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
            aimed = backend == "PostgreSQL" and count == str(AIM_PROCESSES)
            rows.append(
                [
                    backend,
                    count,
                    f"{figures['rate']:,.0f}{spread}",
                    f"{figures['ratio']:.2f}",
                    f"{figures['machine_busy']:.0%}",
                    f"{figures['worker_cores']:.2f}",
                    f"≥ {AIM_RATIO:g} x one" if aimed else "",
                    ("yes" if met else "no") if aimed and met is not None else "",
                ]
            )
    return rows


def render_markdown(report: dict[str, Any], rows: list[list[str]]) -> str:
    machine = report["machine"]
    jobs = next(iter(report["results"].values()))["jobs"]
    rounds = next(iter(report["results"].values()))["rounds"]
    lines = [
        f"<!-- {MARKER}:begin (generated by python -m bench.scaling) -->",
        "",
        "## Scaling out: worker processes",
        "",
        f"The issue's aim: {AIM_PROCESSES} or more worker processes on PostgreSQL drain at"
        f" least {AIM_RATIO:g} times as fast as one. {jobs:,} no-op jobs, queued in one"
        " `enqueue_many` once every process is ready, drained by 1, 2 and 3"
        f" `reliable worker bench.apps:rel --threads {THREADS}` processes started together"
        " (1 and 2 on SQLite, for information); the rate runs from the first attempt's"
        f" start to the last job's finish; median of {rounds} rounds (their range in"
        " brackets), the counts of processes in turn. *Machine CPU busy* is the share of"
        " all cores in use during the drain, whoever used it (workers, database server,"
        " the script); *workers' CPU* is the CPU time of the worker processes per second"
        " of drain.",
        "",
        f"**This machine has {machine['cpus']} cores** (`os.cpu_count()`), shared by the"
        " worker processes, the PostgreSQL server (on the same machine) and the script:"
        f" once {machine['cpus']} processes keep them busy, more processes only share the"
        " same cores, so scaling past 2 processes is bounded by the cores, not by the"
        " claim. The aim needs a machine with more cores than worker processes plus the"
        " database's share.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|--:|--:|--:|--:|--:|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Measured {report['date']} with `{report['command']}` on {machine['cpus']} cores"
        f" ({machine['platform']}, Python {machine['python']}); PostgreSQL"
        f" {machine.get('PostgreSQL', {}).get('server_version', '?')}, SQLite"
        f" {machine.get('SQLite', {}).get('sqlite_version', '?')} (WAL, synchronous="
        f"{machine.get('SQLite', {}).get('synchronous', '?')}); fdatasync p50"
        f" {machine['fdatasync_ms']['p50']:.2f} ms; one-minute load average"
        f" {machine['load_average_before']} before, {machine['load_average_after']} after."
        " bench/results/scaling.json holds every round.",
        "",
        f"<!-- {MARKER}:end -->",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run; docs untouched")
    parser.add_argument("--jobs", type=int, help="jobs per drain (default 30,000)")
    parser.add_argument("--rounds", type=int, help="drains per count of processes (default 3)")
    parser.add_argument(
        "--backends", default="postgresql,sqlite", help="comma-separated: postgresql, sqlite"
    )
    args = parser.parse_args(argv)
    jobs = args.jobs or (5000 if args.quick else 30_000)
    rounds = args.rounds or (1 if args.quick else 3)
    backends = [name.strip().lower() for name in args.backends.split(",") if name.strip()]
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": f"python -m bench.scaling {shown}".strip(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "load_average_before": round(os.getloadavg()[0], 2),
        },
        "results": {},
    }
    print(f"os.cpu_count() = {os.cpu_count()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="reliable-bench-scaling-") as scratch:
        workdir = Path(scratch)
        report["machine"]["fdatasync_ms"] = fdatasync_ms(workdir)
        databases: list[Database] = []
        if "postgresql" in backends:
            url = os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
            databases.append(PostgresDatabase(url))
        if "sqlite" in backends:
            databases.append(SqliteDatabase(workdir))
        for db in databases:
            counts = PROCESSES[db.name]
            report["results"][db.name] = measure(db, counts, jobs, rounds, workdir)
            report["machine"][db.name] = db.describe()
    report["machine"]["load_average_after"] = round(os.getloadavg()[0], 2)
    report["aim"] = {
        "aim": f"PostgreSQL: {AIM_PROCESSES} processes ≥ {AIM_RATIO:g} x one",
        "met": aim_met(report["results"]),
    }
    rows = table_rows(report)
    print(render_text(rows, HEADER))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / ("scaling-quick.json" if args.quick else "scaling.json")
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if not args.quick and {"sqlite", "postgresql"} <= set(backends):
        write_docs(render_markdown(report, rows), MARKER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
