"""Async jobs on one worker: many awaiting sleeps at once, and the drain rate of no-ops.

    python -m bench.async_jobs [--quick] [--sleepers N] [--drain N] [--only SQLite]

For SQLite and PostgreSQL, in one run, on one worker with the default threads:

- ``sleepers``: N jobs (default 1,000) that each ``await asyncio.sleep(0.5)``, queued
  first; the time from the worker's start until the last one succeeded.
- ``drain``: N no-op ``async def`` jobs, then N no-op plain jobs, each queued first,
  drained by a fresh worker; jobs per second of each, and their ratio.

It uses nothing but ``@rel.task``, ``enqueue``, ``start_worker`` and ``stop_worker``, so
that the same script measures an older revision of reliable, run from its worktree.
Writes bench/results/async_jobs.json (async_jobs-quick.json with ``--quick``) and, unless
``--quick``, the "async jobs" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from reliable import Reliable

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/reliable_bench_async"
)
SLEEP_SECONDS = 0.5


def fresh_postgres(url: str) -> str:
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()
    return url


def fresh_url(backend: str, workdir: Path, name: str) -> str:
    if backend == "SQLite":
        return f"sqlite:///{workdir / (name + '.db')}"
    return fresh_postgres(POSTGRES)


def build(url: str) -> Reliable:
    app = Reliable(url, embedded_worker=False, retries=0)

    @app.task
    async def nap(n: int) -> int:
        await asyncio.sleep(SLEEP_SECONDS)
        return n

    @app.task
    async def noop_async(n: int) -> int:
        return n

    @app.task
    def noop_sync(n: int) -> int:
        return n

    return app


def _driver(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql+psycopg"


def run_queue(url: str, task: str, count: int, timeout: float) -> float:
    """Queue ``count`` jobs of ``task``, then time a worker (default threads) from its
    start until every one has succeeded; return the seconds."""
    app = build(url)
    try:
        for n in range(count):
            app.tasks[task].enqueue(n)
        engine = create_engine(make_url(url).set(drivername=_driver(url)))
        query = text(
            "SELECT count(*) FROM reliable_jobs WHERE task = :task AND status = 'succeeded'"
        )
        try:
            started = time.perf_counter()
            app.start_worker()
            deadline = started + timeout
            while True:
                with engine.connect() as connection:
                    done = connection.execute(query, {"task": task}).scalar_one()
                if done >= count:
                    break
                if time.perf_counter() > deadline:
                    raise SystemExit(f"{task}: only {done} of {count} jobs done in {timeout:g}s")
                time.sleep(0.02)
            seconds = time.perf_counter() - started
        finally:
            engine.dispose()
            app.stop_worker(timeout=10)
    finally:
        app.close()
    return seconds


def measure(
    backend: str, workdir: Path, sleepers: int, drain: int, rounds: int
) -> dict[str, float]:
    # Today's executor runs async attempts a thread's worth at a time: allow for it.
    slow_bound = sleepers * SLEEP_SECONDS / 4 * 2 + 120
    sleep_seconds = run_queue(fresh_url(backend, workdir, "sleepers"), "nap", sleepers, slow_bound)
    # Async and plain drains alternate, so that a change in the machine's load falls on
    # both; the medians are kept.
    async_runs, sync_runs = [], []
    for n in range(rounds):
        url = fresh_url(backend, workdir, f"drain-async-{n}")
        async_runs.append(run_queue(url, "noop_async", drain, 600))
        url = fresh_url(backend, workdir, f"drain-sync-{n}")
        sync_runs.append(run_queue(url, "noop_sync", drain, 600))
    async_seconds = statistics.median(async_runs)
    sync_seconds = statistics.median(sync_runs)
    return {
        "sleepers": sleepers,
        "sleepers_seconds": sleep_seconds,
        "sleepers_per_second": sleepers / sleep_seconds,
        "drain_jobs": drain,
        "async_noop_per_second": drain / async_seconds,
        "sync_noop_per_second": drain / sync_seconds,
        "async_over_sync": sync_seconds / async_seconds,
    }


def revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "<!-- bench.async_jobs:begin (generated by python -m bench.async_jobs) -->",
        "",
        "## Async jobs",
        "",
        f"Measured on {report['date']} with `{report['command']}` (one-minute load average "
        f"at the end: {report['load_average']:.2f}). One worker with the default 4 threads "
        f"(`RELIABLE_ASYNC_CONCURRENCY` {report['async_concurrency']}): "
        f"{report['sleepers']:,} queued jobs that each "
        f"`await asyncio.sleep({SLEEP_SECONDS})`, timed from the worker's start to the "
        f"last success; then {report['drain']:,} queued no-op `async def` jobs and as many "
        f"no-op plain ones, each drained by a fresh worker, {report['rounds']} times in "
        "turn (medians).",
        "",
        "| database | sleepers: seconds | sleepers/s | async no-ops/s | plain no-ops/s "
        "| async / plain |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for backend, row in report["results"].items():
        lines.append(
            f"| {backend} | {row['sleepers_seconds']:.1f} | {row['sleepers_per_second']:,.0f} "
            f"| {row['async_noop_per_second']:,.0f} | {row['sync_noop_per_second']:,.0f} "
            f"| {row['async_over_sync']:.2f} |"
        )
    lines += [
        "",
        "Before the event loop (each async attempt through `asyncio.run` on a thread), "
        f"the sleepers took at least {report['sleepers']:,} x {SLEEP_SECONDS} s / 4 threads "
        f"= {report['sleepers'] * SLEEP_SECONDS / 4:.0f} s; on the loop they take at least "
        f"{report['sleepers']:,} x {SLEEP_SECONDS} s / the async concurrency (5 s at 100). "
        "To compare two revisions, run the same script from a worktree of each.",
        "",
        "<!-- bench.async_jobs:end -->",
    ]
    return "\n".join(lines) + "\n"


def write_docs(section: str, marker: str = "bench.async_jobs") -> None:
    """Put ``section`` into docs/benchmarks.md between its ``marker`` comments."""
    path = ROOT / "docs" / "benchmarks.md"
    text_ = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {marker}:begin", f"<!-- {marker}:end -->"
    if begin in text_:
        head, _, rest = text_.partition(begin)
        tail = rest.partition(end)[2].lstrip("\n")
        text_ = head + section + ("\n" + tail if tail else "")
    else:
        text_ = text_.rstrip("\n") + "\n\n" + section
    path.write_text(text_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200 sleepers, 1,000 no-ops")
    parser.add_argument("--sleepers", type=int, help="sleeping jobs (default 1,000)")
    parser.add_argument("--drain", type=int, help="no-op jobs of each kind (default 5,000)")
    parser.add_argument("--only", choices=("SQLite", "PostgreSQL"), help="one database")
    parser.add_argument("--rounds", type=int, default=3, help="drains of each kind (median)")
    args = parser.parse_args()
    sleepers = args.sleepers or (200 if args.quick else 1000)
    drain = args.drain or (1000 if args.quick else 5000)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        for backend in (args.only,) if args.only else ("SQLite", "PostgreSQL"):
            row = measure(backend, Path(directory), sleepers, drain, args.rounds)
            results[backend] = row
            print(backend, {k: round(v, 2) for k, v in row.items()}, flush=True)
    command = "python -m bench.async_jobs" + (" --quick" if args.quick else "")
    for name, value in (("sleepers", args.sleepers), ("drain", args.drain)):
        command += f" --{name} {value}" if value else ""
    command += f" --only {args.only}" if args.only else ""
    command += f" --rounds {args.rounds}" if args.rounds != 3 else ""
    report = {
        "date": date.today().isoformat(),
        "revision": revision(),
        "command": command,
        "load_average": os.getloadavg()[0],
        "sleepers": sleepers,
        "drain": drain,
        "rounds": args.rounds,
        "async_concurrency": os.environ.get("RELIABLE_ASYNC_CONCURRENCY", "100 (default)"),
        "results": results,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = "async_jobs-quick.json" if args.quick else "async_jobs.json"
    (out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / name}")
    if not args.quick:
        write_docs(markdown(report))


if __name__ == "__main__":
    main()
