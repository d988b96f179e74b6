"""Flow control costs: drain rates under caps, and the price of a rate-limit check.

    python -m bench.flow [--quick]

For SQLite and PostgreSQL, in one run: the drain rate of no-op jobs with one worker
process (4 threads) for an uncapped task, ``concurrency=4``, ``Concurrency(1, key=...)``
over 100 keys, and a rate limit set far above the drain rate, each as a ratio of the
uncapped rate; and the enqueue rate with and without ``rate_limit``. Writes
bench/results/flow.json and the "flow control" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from bench.flow_apps import CASES, build
from reliable.limits import plan
from reliable.store.schema import job_scopes, jobs

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/reliable_bench_flow"
)
THREADS = 4
KEYS = 100


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


def load_jobs(url: str, case: str, count: int) -> None:
    """Insert ``count`` due jobs of the case's task in bulk, with their limits resolved."""
    app = build(case, url)
    task = app.tasks["work"]
    now = time.time() - 1
    rows, scopes = [], []
    for i in range(count):
        key = f"k{i % KEYS}"
        flow = plan("work", task.options.flow, lambda _key, _option, key=key: key)
        job_id = uuid.uuid4().hex
        rows.append(
            {
                "id": job_id,
                "task": "work",
                "queue": "default",
                "priority": 0,
                "status": "queued",
                "payload": json.dumps({"args": [key, i], "kwargs": {}}),
                "attempts": 0,
                "run_at": now,
                "created_at": now,
                "limits": flow.limits,
            }
        )
        scopes += [{"scope": scope, "job_id": job_id} for scope in flow.scopes]
    with app.store.engine.begin() as connection:
        for start in range(0, count, 5000):
            connection.execute(jobs.insert(), rows[start : start + 5000])
        if scopes:
            connection.execute(job_scopes.insert(), scopes)
    app.close()


def drain(url: str, case: str, count: int, workdir: Path) -> float:
    """Jobs per second from the first attempt's start to the last one's end."""
    load_jobs(url, case, count)
    env = {**os.environ, "RELIABLE_DATABASE_URL": url, "BENCH_FLOW_CASE": case}
    env["RELIABLE_EMBEDDED_WORKER"] = "0"
    log = (workdir / "worker.log").open("ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reliable.cli",
            "worker",
            "bench.flow_apps:rel",
            "--threads",
            str(THREADS),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    deadline = time.monotonic() + max(120.0, count / 50)
    try:
        while True:
            with engine.connect() as connection:
                done = connection.execute(
                    select(func.count()).where(jobs.c.status == "succeeded")
                ).scalar_one()
                if done >= count:
                    first, last = connection.execute(
                        select(func.min(jobs.c.started_at), func.max(jobs.c.finished_at))
                    ).one()
                    break
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{case}: {done} of {count} done; see {workdir / 'worker.log'}")
            time.sleep(0.25)
    finally:
        worker.terminate()
        worker.wait(30)
        engine.dispose()
        log.close()
    return count / (last - first)


def enqueue_rate(url: str, case: str, count: int) -> float:
    app = build(case, url)
    task = app.tasks["work"]
    for i in range(50):  # warm-up
        task.enqueue("k", i)
    started = time.perf_counter()
    for i in range(count):
        task.enqueue("k", i)
    rate = count / (time.perf_counter() - started)
    app.close()
    return rate


def run(quick: bool) -> dict[str, Any]:
    count = 4000 if quick else 20000
    enqueues = 300 if quick else 2000
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        for backend in ("SQLite", "PostgreSQL"):
            figures: dict[str, Any] = {}
            for n, case in enumerate(CASES):
                url = fresh_url(backend, workdir, f"drain{n}")
                figures[case] = {"drain": drain(url, case, count, workdir)}
                print(f"{backend:<10} drain  {case:<24} {figures[case]['drain']:>8,.0f} jobs/s")
            base = figures["uncapped"]["drain"]
            for case in CASES:
                figures[case]["ratio"] = figures[case]["drain"] / base
            for case in ("uncapped", "rate limit"):
                url = fresh_url(backend, workdir, f"enqueue-{case.replace(' ', '-')}")
                figures[case]["enqueue"] = enqueue_rate(url, case, enqueues)
                print(f"{backend:<10} enqueue {case:<23} {figures[case]['enqueue']:>8,.0f} jobs/s")
            results[backend] = figures
    return {
        "date": date.today().isoformat(),
        "command": "python -m bench.flow" + (" --quick" if quick else ""),
        "jobs": count,
        "threads": THREADS,
        "load_average": os.getloadavg()[0],
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "<!-- bench.flow:begin (generated by python -m bench.flow) -->",
        "",
        "## Flow control",
        "",
        f"Measured on {report['date']} with `{report['command']}`: drain of "
        f"{report['jobs']:,} no-op jobs by one worker process with {report['threads']} "
        f"threads (one-minute load average at the end: {report['load_average']:.2f}).",
        "",
        "| database | case | drain, jobs/s | x uncapped | enqueue, jobs/s |",
        "|---|---|--:|--:|--:|",
    ]
    for backend, figures in report["results"].items():
        for case, row in figures.items():
            enqueue = f"{row['enqueue']:,.0f}" if "enqueue" in row else ""
            lines.append(
                f"| {backend} | {case} | {row['drain']:,.0f} | {row['ratio']:.2f} | {enqueue} |"
            )
    lines += [
        "",
        "Aim: every capped figure >= 0.75 x uncapped. The rate-limit check's cost is the",
        "difference between the two enqueue rates (each enqueue with a rate limit also",
        "locks the scope's row, prunes and counts its window, and records the admission).",
        "",
        "<!-- bench.flow:end -->",
    ]
    return "\n".join(lines) + "\n"


def write_docs(section: str, marker: str = "bench.flow") -> None:
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
    parser.add_argument("--quick", action="store_true", help="fewer jobs, for a smoke run")
    args = parser.parse_args()
    report = run(args.quick)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    name = "flow-quick.json" if args.quick else "flow.json"
    (results / name).write_text(json.dumps(report, indent=2) + "\n")
    if not args.quick:
        write_docs(markdown(report))


if __name__ == "__main__":
    main()
