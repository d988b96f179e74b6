"""Flow control costs: drain rates under caps, and the price of a rate-limit check.

    python -m bench.flow [--quick] [--no-peers]

For SQLite and PostgreSQL, in one run: the drain rate of no-op jobs with one worker
process (4 threads) for an uncapped task, ``concurrency=4``, ``Concurrency(1, key=...)``
over 100 keys, and a rate limit set far above the drain rate, each as a ratio of the
uncapped rate; and the enqueue rate with and without ``rate_limit``. The cases take
turns, five rounds of them (one with --quick), and each figure is the median of its
runs: the machine's speed drifts more between minutes than the cases differ.

Then, in the same run, the same drains by DBOS and PgQueuer (bench/peers/flow_peers.py,
run with the interpreter of bench/peers/.venv, which ``make peers-venv`` creates;
skipped with a note when it is missing or with --no-peers).

Writes bench/results/flow.json and the "flow control" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from bench.async_jobs import fresh_postgres, write_docs
from bench.flow_apps import CASES, build
from reliable.limits import plan
from reliable.store.schema import jobs

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/reliable_bench_flow"
)
THREADS = 4
KEYS = 100
# The peers drain a few hundred jobs per second: fewer jobs keep their turn short.
PEER_JOBS = 4000
PEER_JOBS_QUICK = 1000
PEERS_PYTHON = ROOT / "bench" / "peers" / ".venv" / "bin" / "python"
PEERS_SCRIPT = ROOT / "bench" / "peers" / "flow_peers.py"


def fresh_url(backend: str, workdir: Path, name: str) -> str:
    if backend == "SQLite":
        return f"sqlite:///{workdir / (name + '.db')}"
    return fresh_postgres(POSTGRES)


def load_jobs(url: str, case: str, count: int) -> None:
    """Insert ``count`` due jobs of the case's task in bulk, with their limits resolved."""
    app = build(case, url)
    task = app.tasks["work"]
    now = time.time() - 1
    rows = []
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
    with app.store.engine.begin() as connection:
        for start in range(0, count, 5000):
            connection.execute(jobs.insert(), rows[start : start + 5000])
    app.close()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``; else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(url: str, case: str, count: int, workdir: Path) -> tuple[float, float | None]:
    """Jobs per second from the first attempt's start to the last one's end, and the
    worker process's CPU time per job (µs) while it drained (None where unknown)."""
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
    started: tuple[int, float | None] | None = None  # (jobs done, CPU) once draining
    try:
        while True:
            with engine.connect() as connection:
                done = connection.execute(
                    select(func.count()).where(jobs.c.status == "succeeded")
                ).scalar_one()
                if started is None and done > 0:
                    started = (done, cpu_seconds(worker.pid))
                if done >= count:
                    ended = cpu_seconds(worker.pid)
                    first, last = connection.execute(
                        select(func.min(jobs.c.started_at), func.max(jobs.c.finished_at))
                    ).one()
                    break
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{case}: {done} of {count} done; see {workdir / 'worker.log'}")
            time.sleep(0.1 if started is None else 0.25)
    finally:
        worker.terminate()
        worker.wait(30)
        engine.dispose()
        log.close()
    cpu = None
    if started is not None and started[1] is not None and ended is not None and count > started[0]:
        cpu = (ended - started[1]) / (count - started[0]) * 1e6
    return count / (last - first), cpu


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


def run(quick: bool, peers: bool) -> dict[str, Any]:
    count = 4000 if quick else 40000
    enqueues = 300 if quick else 2000
    rounds = 1 if quick else 5
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        for backend in ("SQLite", "PostgreSQL"):
            runs: dict[str, list[float]] = {case: [] for case in CASES}
            cpus: dict[str, list[float]] = {case: [] for case in CASES}
            for turn in range(rounds):
                for n, case in enumerate(CASES):
                    url = fresh_url(backend, workdir, f"drain{turn}-{n}")
                    rate, cpu = drain(url, case, count, workdir)
                    runs[case].append(rate)
                    if cpu is not None:
                        cpus[case].append(cpu)
                    print(f"{backend:<10} drain  {case:<24} {rate:>8,.0f} jobs/s")
            figures: dict[str, Any] = {
                case: {
                    "drain": statistics.median(runs[case]),
                    "runs": runs[case],
                    "cpu_us_per_job": statistics.median(cpus[case]) if cpus[case] else None,
                }
                for case in CASES
            }
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
        "rounds": rounds,
        "load_average": os.getloadavg()[0],
        "results": results,
        "peers": run_peers(PEER_JOBS_QUICK if quick else PEER_JOBS)
        if peers
        else {"skipped": "--no-peers"},
    }


def run_peers(count: int) -> dict[str, Any]:
    """The peers' figures (bench/peers/flow_peers.py, ``count`` jobs), or why none."""
    if not PEERS_PYTHON.exists():
        return {"skipped": "bench/peers/.venv is missing: run `make peers-venv` first"}
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "peers.json"
        done = subprocess.run(
            [str(PEERS_PYTHON), str(PEERS_SCRIPT), "--jobs", str(count), "--out", str(out)],
            cwd=ROOT,
        )
        if done.returncode != 0 or not out.exists():
            return {"skipped": f"bench/peers/flow_peers.py exited with {done.returncode}"}
        report: dict[str, Any] = json.loads(out.read_text())
    report.get("notes", {})["command"] = f"bench/peers/flow_peers.py --jobs {count}"
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "<!-- bench.flow:begin (generated by python -m bench.flow) -->",
        "",
        "## Flow control",
        "",
        f"Measured on {report['date']} with `{report['command']}`: drain of "
        f"{report['jobs']:,} no-op jobs by one worker process with {report['threads']} "
        f"threads, from the first attempt's start to the last one's end; each figure the "
        f"median of {report['rounds']} runs, the cases taking turns (one-minute load "
        f"average at the end: {report['load_average']:.2f}).",
        "",
        "| database | case | drain, jobs/s | x uncapped | runs | x uncapped, per round "
        "| worker CPU, µs/job | enqueue, jobs/s |",
        "|---|---|--:|--:|---|---|--:|--:|",
    ]
    for backend, figures in report["results"].items():
        base = figures["uncapped"].get("runs", ())
        for case, row in figures.items():
            enqueue = f"{row['enqueue']:,.0f}" if "enqueue" in row else ""
            runs = ", ".join(f"{run:,.0f}" for run in row.get("runs", ()))
            rounds = ", ".join(
                f"{run / b:.2f}" for run, b in zip(row.get("runs", ()), base, strict=True)
            )
            cpu = row.get("cpu_us_per_job")
            lines.append(
                f"| {backend} | {case} | {row['drain']:,.0f} | {row['ratio']:.2f} | {runs} "
                f"| {rounds} | {'' if cpu is None else f'{cpu:,.0f}'} | {enqueue} |"
            )
    lines += [
        "",
        "Aim: every capped figure >= 0.75 x uncapped. `x uncapped` is the ratio of the",
        "medians; per round, each run is set against the uncapped run of the same round,",
        "a minute or so earlier. Worker CPU is the worker process's",
        "user + system time while it drained, per job (median of the runs). The rate-limit",
        "check's cost is the difference between the two enqueue rates (each enqueue with a",
        "rate limit also locks the scope's row, prunes and counts its window, and records",
        "the admission).",
        "",
        *peers_markdown(report),
        "<!-- bench.flow:end -->",
    ]
    return "\n".join(lines) + "\n"


def figure(row: dict[str, Any] | None) -> str:
    """A peer's drain and its ratio to its own uncapped drain, or why there is none."""
    if row is None:
        return "-"
    if "drain" not in row:
        reason = row.get("skipped") or row.get("timeout") or row.get("error") or "no figure"
        return f"none ({reason})" if len(str(reason)) < 60 else "none (see flow.json)"
    ratio = f" ({row['ratio']:.2f}x)" if row.get("ratio") is not None else ""
    return f"{row['drain']:,.0f}{ratio}"


def peers_markdown(report: dict[str, Any]) -> list[str]:
    """The peers beside reliable on PostgreSQL, when they were measured."""
    peers = report.get("peers", {})
    if "peers" not in peers:
        return [f"Peers: not measured in this run ({peers.get('skipped', 'no figures')}).", ""]
    ours = report["results"]["PostgreSQL"]
    cases = CASES[:3]
    lines = [
        "### Beside DBOS and PgQueuer, on PostgreSQL",
        "",
        "Drain in jobs/s and, in brackets, the ratio to the same library's uncapped drain,",
        f"in the same run: reliable as above ({report['jobs']:,} jobs), the peers by",
        f"bench/peers/flow_peers.py ({peers['jobs']:,} jobs each; they drain far slower),",
        "one worker process each. How each peer is set up, and why, is in that file's",
        "docstring; `4 in flight` holds at most 4 jobs at once as reliable's 4 threads do,",
        "`unbounded claims` is the peer's default claiming.",
        "",
        "| library | " + " | ".join(cases) + " |",
        "|---|" + "--:|" * len(cases),
        "| reliable (4 threads) | "
        + " | ".join(f"{ours[c]['drain']:,.0f} ({ours[c]['ratio']:.2f}x)" for c in cases)
        + " |",
    ]
    notes = []
    for name, info in peers["peers"].items():
        variants = {"4 in flight": info, **info.get("variants", {})}
        for variant, setup in variants.items():
            row = [figure(setup.get("cases", {}).get(case)) for case in cases]
            label = f"{name} {info.get('version', '?')} ({variant})"
            lines.append(f"| {label} | " + " | ".join(row) + " |")
            if setup.get("config"):
                notes.append(f"- {label}: {setup['config']}")
    return [*lines, "", *notes, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer jobs, for a smoke run")
    parser.add_argument("--no-peers", action="store_true", help="leave DBOS and PgQueuer out")
    args = parser.parse_args()
    report = run(args.quick, peers=not args.no_peers)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    name = "flow-quick.json" if args.quick else "flow.json"
    (results / name).write_text(json.dumps(report, indent=2) + "\n")
    if not args.quick:
        write_docs(markdown(report), "bench.flow")


if __name__ == "__main__":
    main()
