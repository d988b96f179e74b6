"""Peer drain rates: DBOS Transact and PgQueuer under the caps that bench.flow measures.

    bench/peers/.venv/bin/python bench/peers/flow_peers.py [--jobs N] [--quick] [--out PATH]

Run it with the interpreter of bench/peers/.venv, which bench/peers/setup.sh (``make
peers-venv``) creates with the pinned versions of bench/peers/requirements.txt.

What is measured
----------------
For each peer, case and variant, on local PostgreSQL (BENCH_PEERS_POSTGRES_URL, default
postgres@127.0.0.1:5432; only the scratch databases reliable_bench_peers_dbos and
reliable_bench_peers_pgq are touched, each dropped and recreated per case and dropped at
the end):

1. a setup process installs the peer's schema and enqueues N no-op jobs in bulk through
   the peer's own API, spread round-robin over 100 keys ``k0`` .. ``k99``;
2. then ONE worker process of the peer is started (bench.flow runs one reliable worker
   with 4 threads);
3. the drain rate is N divided by the time from the first job's start to the last job's
   end, both read from the timestamps the peer itself records, as bench.flow does
   (``drain``). Beside it, ``wall`` is N divided by the time from starting the worker
   process to seeing every job done (polled every 0.25 s), and ``ratio`` is the drain
   over the uncapped drain of the same peer and variant.

A case is bounded by --timeout seconds (setup and drain each); one that does not finish
is reported as a timeout with the number of jobs done, not waited for.

Cases
-----
- ``uncapped``: no limit on the job type.
- ``concurrency=4``: at most 4 jobs of the type running at once, across all workers.
- ``per-key cap (100 keys)``: at most 1 job per key running at once.

DBOS (PyPI ``dbos``; docs.dbos.dev/python/reference/queues and
docs.dbos.dev/python/tutorials/queue-tutorial): the job is a no-op ``@DBOS.workflow`` on a
queue declared with ``DBOS.register_queue``; jobs are enqueued with
``DBOSClient.enqueue_in_transaction``, 1,000 per transaction; the worker is a process that
calls ``DBOS.launch()``. ``concurrency=4`` is ``global_concurrency=4`` (formerly
``concurrency``); the per-key cap is a partitioned queue: ``partition_concurrency=1``, each
job enqueued with its key as ``queue_partition_key``. Every queue sets
``polling_interval_sec`` (--dbos-polling-interval, default 0.001 s, the fastest of 0.001,
0.005, 0.01 and 0.05 s tried here). DBOS's default is 1 s, and a worker claims at most
what its limits leave free once per poll, so with any limit of 4 the default would hold
the drain to about 4 jobs/s.

PgQueuer (PyPI ``pgqueuer``; its docs' guides/performance-tuning page): the job is a
no-op ``async`` entrypoint; jobs are enqueued with one ``Queries.enqueue`` call of N rows;
the worker runs ``pgqueuer.run`` (what ``pgq run`` does, on uvloop) over
``PgQueuer.from_asyncpg_pool`` (the asyncpg pool driver the performance guide recommends
for throughput). ``concurrency=4`` is the entrypoint's ``concurrency_limit=4`` (enforced in
SQL across workers; the ``serialized_dispatch`` flag of older releases is now
``concurrency_limit=1``). PgQueuer has no per-key limit, its limits are per entrypoint, so
the per-key cap is emulated: 100 entrypoints ``work.k0`` .. ``work.k99`` share the handler,
each with ``concurrency_limit=1``, and every job goes to its key's entrypoint. That case
is marked ``"emulated"``: it only works for a set of keys fixed when the worker starts.

Variants (how "one worker with 4-way concurrency" maps onto each peer)
----------------------------------------------------------------------
- ``4 in flight`` (the ``cases`` of each peer): the worker holds at most 4 jobs at once.
  DBOS: the queue's ``worker_concurrency=4`` (DBOS's executor pool is otherwise
  unbounded). PgQueuer: ``max_concurrent_tasks=4`` with ``batch_size=2``
  (--pgq-batch-size; PgQueuer requires ``max_concurrent_tasks >= 2 * batch_size``).
- ``unbounded claims`` (under ``variants``; skipped with --no-variants): each peer's
  default claiming. DBOS: no ``worker_concurrency``, so a poll claims every job the
  queue's limits allow, run on ``max_executor_threads=4``. PgQueuer: the default
  ``batch_size=10`` and no ``max_concurrent_tasks``, so the worker keeps claiming batches
  while the queue gives it jobs.

Output: one line per case on stderr, and on --out (default stdout) the JSON document::

    {"peers": {"DBOS": {"version": "...", "config": "...",
                        "cases": {"uncapped": {"drain": ..., "wall": ..., "ratio": ...},
                                  "concurrency=4": {...}, "per-key cap (100 keys)": {...}},
                        "variants": {"unbounded claims": {"config": "...", "cases": {...}}}},
               "PgQueuer": {...}},
     "jobs": N, "notes": {...}}

A case that did not produce a rate has ``timeout`` or ``error`` instead of ``drain``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import date
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

SERVER = os.environ.get("BENCH_PEERS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
DATABASES = {"DBOS": "reliable_bench_peers_dbos", "PgQueuer": "reliable_bench_peers_pgq"}
PACKAGES = {"DBOS": "dbos", "PgQueuer": "pgqueuer"}
CASES = ("uncapped", "concurrency=4", "per-key cap (100 keys)")
PRIMARY, UNBOUNDED = "4 in flight", "unbounded claims"
VARIANTS = (PRIMARY, UNBOUNDED)
CONCURRENCY = 4
KEYS = 100

DBOS_APP = "reliable_bench_peers"
DBOS_QUEUE = "work"
DBOS_ENQUEUE_CHUNK = 1000
PGQ_DEFAULT_BATCH = 10


def key_of(i: int) -> str:
    return f"k{i % KEYS}"


def database_url(name: str) -> str:
    """The URL of scratch database ``name`` on the benchmark's server."""
    if name not in DATABASES.values():
        raise ValueError(f"{name!r} is not one of the scratch databases {list(DATABASES.values())}")
    parts = urlsplit(SERVER)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def recreate_database(name: str, *, create: bool = True) -> str:
    """Drop scratch database ``name`` and, if ``create``, make it anew; its URL."""
    url = database_url(name)
    admin = urlunsplit(urlsplit(url)._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            connection.execute(f'CREATE DATABASE "{name}"')
    return url


# DBOS ---------------------------------------------------------------------------------------


def dbos_queue_options(case: str, variant: str, polling_interval: float) -> dict[str, Any]:
    """Keyword arguments of ``DBOS.register_queue`` for ``case`` and ``variant``."""
    options: dict[str, Any] = {"polling_interval_sec": polling_interval}
    if variant == PRIMARY:
        options["worker_concurrency"] = CONCURRENCY
    if case == "concurrency=4":
        options["global_concurrency"] = CONCURRENCY
    elif case == "per-key cap (100 keys)":
        options["partition_concurrency"] = 1
    return options


def dbos_config(variant: str, polling_interval: float) -> str:
    threads = f", max_executor_threads={CONCURRENCY}" if variant == UNBOUNDED else ""
    options = ", ".join(
        f"{name}={value}"
        for name, value in dbos_queue_options("uncapped", variant, polling_interval).items()
    )
    return f"one process calling DBOS.launch(){threads}; queue: {options}"


def dbos_launch(url: str, variant: str, *, listen: bool) -> None:
    """Configure DBOS with the no-op workflow and launch it (dequeuing only if ``listen``)."""
    from dbos import DBOS, DBOSConfig

    config: DBOSConfig = {
        "name": DBOS_APP,
        "system_database_url": url,
        "application_version": "bench",
        "log_level": "WARNING",
    }
    if variant == UNBOUNDED:
        config["max_executor_threads"] = CONCURRENCY
    DBOS(config=config)

    @DBOS.workflow(name="work")
    def work(key: str, i: int) -> None: ...

    if not listen:
        DBOS.listen_queues([])
    DBOS.launch()


def dbos_setup(url: str, case: str, variant: str, jobs: int, polling_interval: float) -> None:
    from dbos import DBOS, DBOSClient, EnqueueOptions
    from sqlalchemy import create_engine

    dbos_launch(url, variant, listen=False)
    DBOS.register_queue(DBOS_QUEUE, **dbos_queue_options(case, variant, polling_interval))
    client = DBOSClient(system_database_url=url, application_name=DBOS_APP)
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        for start in range(0, jobs, DBOS_ENQUEUE_CHUNK):
            with engine.begin() as connection:
                for i in range(start, min(jobs, start + DBOS_ENQUEUE_CHUNK)):
                    options: EnqueueOptions = {"workflow_name": "work", "queue_name": DBOS_QUEUE}
                    if case == "per-key cap (100 keys)":
                        options["queue_partition_key"] = key_of(i)
                    client.enqueue_in_transaction(connection, options, key_of(i), i)
    finally:
        engine.dispose()
        client.destroy()
        DBOS.destroy()


def dbos_worker(url: str, variant: str) -> None:
    from dbos import DBOS

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dbos_launch(url, variant, listen=True)
    stop.wait()
    DBOS.destroy()


DBOS_PROGRESS = (
    "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
    " count(*) FILTER (WHERE status IN ('ERROR', 'CANCELLED', 'MAX_RECOVERY_ATTEMPTS_EXCEEDED')),"
    " min(started_at_epoch_ms) / 1000.0, max(completed_at) / 1000.0"
    " FROM dbos.workflow_status WHERE queue_name = %s"
)


# PgQueuer -----------------------------------------------------------------------------------


def pgq_entrypoints(case: str) -> dict[str, int]:
    """Entrypoint name -> ``concurrency_limit`` for ``case``."""
    if case == "uncapped":
        return {"work": 0}
    if case == "concurrency=4":
        return {"work": CONCURRENCY}
    return {f"work.{key_of(k)}": 1 for k in range(KEYS)}


def pgq_entrypoint(case: str, i: int) -> str:
    return f"work.{key_of(i)}" if case == "per-key cap (100 keys)" else "work"


def pgq_run_options(variant: str, batch_size: int) -> dict[str, Any]:
    """Keyword arguments of ``pgqueuer.run`` for ``variant``."""
    if variant == PRIMARY:
        return {"batch_size": batch_size, "max_concurrent_tasks": CONCURRENCY}
    return {"batch_size": PGQ_DEFAULT_BATCH, "max_concurrent_tasks": None}


def pgq_config(variant: str, batch_size: int) -> str:
    options = ", ".join(f"{k}={v}" for k, v in pgq_run_options(variant, batch_size).items())
    return f"one process running pgqueuer.run on uvloop over an asyncpg pool; {options}"


async def pgq_setup(url: str, case: str, jobs: int) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    connection = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(connection))
        await queries.install()
        await queries.enqueue(
            [pgq_entrypoint(case, i) for i in range(jobs)],
            [json.dumps({"key": key_of(i), "i": i}).encode() for i in range(jobs)],
            [0] * jobs,
        )
    finally:
        await connection.close()


@asynccontextmanager
async def pgq_factory(url: str, case: str) -> AsyncIterator[Any]:
    """The worker's PgQueuer: an asyncpg pool and the case's entrypoints."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    pool = await asyncpg.create_pool(url, max_size=10)
    try:
        pgq = PgQueuer.from_asyncpg_pool(pool)

        async def work(job: Job) -> None: ...

        for name, limit in pgq_entrypoints(case).items():
            pgq.entrypoint(name, concurrency_limit=limit)(work)
        yield pgq
    finally:
        await pool.close()


def pgq_worker(url: str, case: str, variant: str, batch_size: int) -> None:
    """Run the worker as ``pgq run`` does (uvloop; SIGTERM stops it), through ``pgqueuer.run``."""
    import pgqueuer
    import uvloop

    factory = functools.partial(pgq_factory, url, case)
    uvloop.run(pgqueuer.run(factory, **pgq_run_options(variant, batch_size)))


PGQ_PROGRESS = (
    "SELECT count(*) FILTER (WHERE status = 'successful'),"
    " count(*) FILTER (WHERE status IN ('exception', 'failed', 'canceled', 'deleted')),"
    " extract(epoch FROM min(created) FILTER (WHERE status = 'picked')),"
    " extract(epoch FROM max(created) FILTER (WHERE status = 'successful'))"
    " FROM pgqueuer_log"
)

PGQ_EMULATION = (
    "no per-key limit in PgQueuer: 100 entrypoints work.k0..work.k99 sharing one handler, "
    "each with concurrency_limit=1, every job enqueued on its key's entrypoint"
)


# Orchestration ------------------------------------------------------------------------------


def child(role: str, peer: str, case: str, variant: str, url: str, args: Any) -> list[str]:
    """The command line of a setup or worker process of this script."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--role", role, "--peer", peer, "--case", case, "--variant", variant),
        *("--database-url", url, "--jobs", str(args.jobs)),
        *("--dbos-polling-interval", str(args.dbos_polling_interval)),
        *("--pgq-batch-size", str(args.pgq_batch_size)),
    ]


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_case(peer: str, case: str, variant: str, args: Any, log_path: Path) -> dict[str, Any]:
    """Set up, drain and time one case; a failure or timeout is returned, not raised."""
    url = recreate_database(DATABASES[peer])
    with log_path.open("ab") as log:
        try:
            subprocess.run(
                child("setup", peer, case, variant, url, args),
                stdout=log,
                stderr=log,
                timeout=args.timeout,
                check=True,
            )
        except subprocess.TimeoutExpired:
            return {"timeout": f"setup took over {args.timeout:.0f} s"}
        except subprocess.CalledProcessError:
            return {"error": "setup failed: " + tail(log_path)}

        query, params = (DBOS_PROGRESS, (DBOS_QUEUE,)) if peer == "DBOS" else (PGQ_PROGRESS, ())
        started = time.monotonic()
        worker = subprocess.Popen(
            child("worker", peer, case, variant, url, args), stdout=log, stderr=log
        )
        try:
            with psycopg.connect(url, autocommit=True) as connection:
                while True:
                    row = connection.execute(query, params).fetchone()
                    assert row is not None
                    done, failed = int(row[0]), int(row[1])
                    first, last = (None if x is None else float(x) for x in row[2:4])
                    elapsed = time.monotonic() - started
                    if done + failed >= args.jobs:
                        break
                    if worker.poll() is not None:
                        return {"error": f"worker exited, {done} done: " + tail(log_path)}
                    if elapsed > args.timeout:
                        span = last - first if first and last else 0.0
                        return {
                            "timeout": f"{done} of {args.jobs} done after {args.timeout:.0f} s",
                            "completed": done,
                            "partial_drain": done / span if span > 0 else None,
                        }
                    time.sleep(0.25)
        finally:
            stop(worker)
    if failed or first is None or last is None:
        return {"error": f"{failed} of {args.jobs} jobs failed"}
    return {"drain": args.jobs / (last - first), "wall": args.jobs / elapsed}


def describe(result: dict[str, Any]) -> str:
    if "drain" in result:
        line = f"{result['drain']:>8,.0f} jobs/s  (worker start to done: {result['wall']:,.0f})"
        return line + ("  emulated" if "emulated" in result else "")
    kind = next(kind for kind in ("timeout", "error") if kind in result)
    return f"{kind}: {result[kind]}"


def run_variant(peer: str, variant: str, args: Any, workdir: Path) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for n, case in enumerate(CASES):
        log_path = workdir / f"{peer}-{VARIANTS.index(variant)}-{n}.log"
        result = run_case(peer, case, variant, args, log_path)
        if peer == "PgQueuer" and case == "per-key cap (100 keys)":
            result["emulated"] = PGQ_EMULATION
        cases[case] = result
        print(f"{peer:<9} {variant:<17} {case:<23} {describe(result)}", file=sys.stderr, flush=True)
    base = cases["uncapped"].get("drain")
    for result in cases.values():
        if base and "drain" in result:
            result["ratio"] = result["drain"] / base
    if peer == "DBOS":
        config = dbos_config(variant, args.dbos_polling_interval)
    else:
        config = pgq_config(variant, args.pgq_batch_size)
    return {"config": config, "cases": cases}


def run(args: Any) -> dict[str, Any]:
    load_before = os.getloadavg()
    peers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        for peer in args.peers:
            primary = run_variant(peer, PRIMARY, args, Path(directory))
            peers[peer] = {"version": version(PACKAGES[peer]), **primary}
            if args.variants:
                unbounded = run_variant(peer, UNBOUNDED, args, Path(directory))
                peers[peer]["variants"] = {UNBOUNDED: unbounded}
            recreate_database(DATABASES[peer], create=False)
    return {
        "peers": peers,
        "jobs": args.jobs,
        "notes": {
            "date": date.today().isoformat(),
            "command": "bench/peers/.venv/bin/python bench/peers/flow_peers.py "
            + " ".join(sys.argv[1:]),
            "drain": "jobs / (last job's end - first job's start), from the peer's own "
            "timestamps (DBOS: workflow_status.started_at_epoch_ms and completed_at; "
            "PgQueuer: pgqueuer_log 'picked' and 'successful' rows)",
            "wall": "jobs / (worker process start to every job seen done, polled every 0.25 s)",
            "ratio": "drain / uncapped drain of the same peer and variant",
            "cases": "concurrency=4: DBOS global_concurrency=4, PgQueuer concurrency_limit=4; "
            "per-key cap: DBOS partition_concurrency=1 with queue_partition_key, PgQueuer "
            + PGQ_EMULATION,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "cpus": os.cpu_count(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, help="jobs per case (default 20,000)")
    parser.add_argument("--quick", action="store_true", help="4,000 jobs per case")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--peers", nargs="+", choices=list(DATABASES), default=list(DATABASES))
    parser.add_argument(
        "--no-variants", dest="variants", action="store_false", help="only the 4-in-flight cases"
    )
    parser.add_argument("--dbos-polling-interval", type=float, default=0.001, help="seconds")
    parser.add_argument("--pgq-batch-size", type=int, default=CONCURRENCY // 2)
    parser.add_argument("--role", choices=("setup", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--peer", choices=list(DATABASES), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jobs is None:
        args.jobs = 4000 if args.quick else 20000

    if args.role is not None:
        a = args
        roles: dict[tuple[str, str], Callable[[], Any]] = {
            ("setup", "DBOS"): lambda: dbos_setup(
                a.database_url, a.case, a.variant, a.jobs, a.dbos_polling_interval
            ),
            ("worker", "DBOS"): lambda: dbos_worker(a.database_url, a.variant),
            ("setup", "PgQueuer"): lambda: asyncio.run(pgq_setup(a.database_url, a.case, a.jobs)),
            ("worker", "PgQueuer"): lambda: pgq_worker(
                a.database_url, a.case, a.variant, a.pgq_batch_size
            ),
        }
        roles[args.role, args.peer]()
        return

    report = json.dumps(run(args), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(report)
    else:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
