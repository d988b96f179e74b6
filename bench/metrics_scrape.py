"""What a Prometheus scrape costs at a million jobs.

The jobs table is filled with ``--jobs`` rows (default 1,000,000) through SQLAlchemy
Core ``executemany`` on the store's own table: seven tasks, 90% succeeded, 5% failed,
5% queued. ``reliable.metrics.exposition`` is then timed (the mean of ``--rounds``
scrapes after two warm-ups) right after the load, and again after ``ANALYZE`` (on
PostgreSQL ``VACUUM ANALYZE``, as autovacuum would do after such a load: until then
PostgreSQL cannot answer the counts from the index alone).

Run from the repository root::

    python -m bench.metrics_scrape                    # SQLite and PostgreSQL
    python -m bench.metrics_scrape --jobs 20000       # a quick check

PostgreSQL comes from ``BENCH_POSTGRES_URL`` (default: the scratch database
``reliable_bench``); its ``reliable_*`` tables are emptied first.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text

from reliable import Reliable
from reliable.metrics import exposition
from reliable.store.schema import jobs, metadata

POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1/reliable_bench")
STATUSES = ["succeeded"] * 90 + ["failed"] * 5 + ["queued"] * 5


def fill(rel: Reliable, count: int) -> None:
    """``count`` jobs, one a second up to now, in batches of 10,000."""
    now = time.time()
    store = rel.store
    with store.engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())
        batch = []
        for i in range(count):
            batch.append(
                {
                    "id": uuid.uuid4().hex,
                    "task": f"task{i % 7}",
                    "queue": "default",
                    "status": STATUSES[i % len(STATUSES)],
                    "payload": "{}",
                    "attempts": 1,
                    "run_at": now - count + i,
                    "created_at": now - count + i,
                }
            )
            if len(batch) == 10_000:
                connection.execute(jobs.insert(), batch)
                batch = []
        if batch:
            connection.execute(jobs.insert(), batch)


def scrape_ms(rel: Reliable, rounds: int) -> float:
    for _ in range(2):
        exposition(rel.runtime)
    started = time.perf_counter()
    for _ in range(rounds):
        exposition(rel.runtime)
    return (time.perf_counter() - started) / rounds * 1000


def run(url: str, count: int, rounds: int) -> None:
    rel = Reliable(url, embedded_worker=False)
    try:
        fill(rel, count)
        fresh = scrape_ms(rel, rounds)
        store = rel.store
        analyze = "VACUUM ANALYZE reliable_jobs" if store.dialect == "postgresql" else "ANALYZE"
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(analyze))
        analyzed = scrape_ms(rel, rounds)
        print(
            f"{store.dialect:10} {count:>9,} jobs: {fresh:6.0f} ms a scrape after the load, "
            f"{analyzed:6.0f} ms after {analyze.split(' reliable_jobs')[0]}"
        )
    finally:
        rel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        run(f"sqlite:///{Path(directory) / 'jobs.db'}", args.jobs, args.rounds)
    if not args.sqlite_only:
        run(POSTGRES, args.jobs, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
