"""Peer enqueue rates, for ``python -m bench.enqueue``: huey and PgQueuer.

    bench/peers/.venv/bin/python bench/peers/core_peers.py huey --path FILE --jobs N
    bench/peers/.venv/bin/python bench/peers/core_peers.py pgqueuer --jobs N
    bench/peers/.venv/bin/python bench/peers/core_peers.py huey --path FILE --serve

Run with the interpreter of bench/peers/.venv (``make peers-venv``: the pinned versions
of bench/peers/requirements.txt). Prints one JSON object: ``{"jobs": N, "seconds": s,
"rate": N / s}``, after a warm-up of ``WARMUP`` enqueues that is not counted. With
``--serve`` it prints ``ready`` after the warm-up, then for each line ``N`` read from
stdin makes N enqueues and prints the seconds they took (so that bench.enqueue can
interleave them with its own contenders, in blocks); an empty line ends it.

- huey (PyPI ``huey``): ``SqliteHuey(filename=FILE, fsync=True)`` (WAL, and
  ``PRAGMA synchronous=FULL``: the durability of reliable's default), a no-op
  ``@huey.task()`` called N times; each call is one enqueue, one committed INSERT.
- PgQueuer (PyPI ``pgqueuer``): ``Queries.enqueue("noop", payload, 0)`` N times on one
  asyncpg connection, each its own transaction, into the scratch database
  ``reliable_bench_peers_pgq`` (dropped and recreated first) on
  BENCH_PEERS_POSTGRES_URL (default postgres@127.0.0.1:5432).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

SERVER = os.environ.get("BENCH_PEERS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
PGQ_DATABASE = "reliable_bench_peers_pgq"
WARMUP = 50


def huey_enqueue(path: str) -> Callable[[int], object]:
    from huey import SqliteHuey

    huey = SqliteHuey(filename=path, fsync=True)

    @huey.task()
    def noop(i: int) -> None: ...

    return noop


def recreate_pgq_database() -> str:
    import psycopg

    parts = urlsplit(SERVER)
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{PGQ_DATABASE}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{PGQ_DATABASE}"')
    return urlunsplit((parts.scheme, parts.netloc, "/" + PGQ_DATABASE, parts.query, ""))


def pgqueuer_enqueue(loop: asyncio.AbstractEventLoop) -> Callable[[int], object]:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    connection = loop.run_until_complete(asyncpg.connect(recreate_pgq_database()))
    queries = Queries(AsyncpgDriver(connection))
    loop.run_until_complete(queries.install())

    def enqueue(i: int) -> object:
        payload = json.dumps({"i": i}).encode()
        return loop.run_until_complete(queries.enqueue("noop", payload, 0))

    return enqueue


def timed(enqueue: Callable[[int], object], jobs: int) -> float:
    started = time.perf_counter()
    for i in range(jobs):
        enqueue(i)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=("huey", "pgqueuer"))
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--path", help="huey: the SQLite file (created)")
    parser.add_argument("--serve", action="store_true", help="timed blocks read from stdin")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    if args.peer == "huey":
        if not args.path:
            parser.error("huey needs --path")
        enqueue = huey_enqueue(args.path)
    else:
        enqueue = pgqueuer_enqueue(loop)
    timed(enqueue, WARMUP)
    if not args.serve:
        seconds = timed(enqueue, args.jobs)
        print(json.dumps({"jobs": args.jobs, "seconds": seconds, "rate": args.jobs / seconds}))
        return
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(timed(enqueue, int(line)), flush=True)


if __name__ == "__main__":
    main()
