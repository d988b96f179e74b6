"""An order and its job in one transaction, beside the order's commit then ``enqueue``.

On SQLite (a file in a temporary directory) and on PostgreSQL, one application engine
(``create_engine``, as an application makes it) shared with the job store
(``Reliable(engine=engine)``), the same ``orders`` table, the same task:

- one transaction: ``INSERT`` the order, ``task.options(session=session).enqueue(id)``,
  ``commit``: one commit, so one fsync (SQLite) or one WAL flush (PostgreSQL);
- two transactions: ``INSERT`` the order, ``commit``, then ``task.enqueue(id)`` in a
  transaction of the store's own: two commits.

The two ways take turns in blocks of ``--block`` orders until each has written
``--orders``, so that both see the same machine load; reported per way: orders per
second over all its blocks, the median block's rate, and the latency of one order
(p50, p99). The aim: one transaction at least 1.5 times the rate of two.

Run from the repository root::

    python -m bench.transactions                    # bench/results/transactions.json
    python -m bench.transactions --orders 500 --backends sqlite

PostgreSQL comes from ``BENCH_POSTGRES_URL`` (default: the scratch database
``reliable_bench_transactions``, created if missing); its ``orders`` and ``reliable_*``
tables are emptied first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from reliable import Reliable
from reliable.store.schema import metadata as reliable_metadata

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transactions.json"
POSTGRES_URL_ENV = "BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/reliable_bench_transactions"
AIM = 1.5

app_metadata = MetaData()
orders = Table("orders", app_metadata, Column("id", Integer, primary_key=True))


def postgres_engine(raw: str) -> Engine:
    """An engine on the PostgreSQL database ``raw``, created if missing."""
    url = make_url(raw).set(drivername="postgresql+psycopg")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        found = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
        ).first()
        if not found:
            connection.execute(text(f'CREATE DATABASE "{url.database}"'))
    admin.dispose()
    return create_engine(url)


def empty(engine: Engine) -> None:
    app_metadata.drop_all(engine)
    app_metadata.create_all(engine)
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            if engine.dialect.has_table(connection, "reliable_jobs"):
                names = ", ".join(table.name for table in reliable_metadata.sorted_tables)
                connection.execute(text(f"TRUNCATE {names}"))


def measure(engine: Engine, count: int, block: int) -> dict[str, Any]:
    """Both ways on ``engine``, taking turns; their figures."""
    empty(engine)
    rel = Reliable(engine=engine, embedded_worker=False)

    @rel.task(name="bench_receipt")
    def receipt(order_id: int) -> int:
        return order_id

    def one_transaction(order_id: int) -> None:
        with Session(engine) as session:
            session.execute(insert(orders).values(id=order_id))
            receipt.options(session=session).enqueue(order_id)
            session.commit()

    def two_transactions(order_id: int) -> None:
        with Session(engine) as session:
            session.execute(insert(orders).values(id=order_id))
            session.commit()
        receipt.enqueue(order_id)

    ways: dict[str, Callable[[int], None]] = {
        "one_transaction": one_transaction,
        "two_transactions": two_transactions,
    }
    rel.store  # noqa: B018 - schema in place before the clock starts
    for name, way in ways.items():  # warm the pool and the statement caches
        for i in range(20):
            way(-(i + 1) - (0 if name == "one_transaction" else 1000))
    latencies: dict[str, list[float]] = {name: [] for name in ways}
    blocks: dict[str, list[float]] = {name: [] for name in ways}
    next_id = 0
    while min(len(values) for values in latencies.values()) < count:
        for name, way in ways.items():
            size = min(block, count - len(latencies[name]))
            started = time.perf_counter()
            for _ in range(size):
                next_id += 1
                before = time.perf_counter()
                way(next_id)
                latencies[name].append(time.perf_counter() - before)
            blocks[name].append(size / (time.perf_counter() - started))
    with engine.connect() as connection:
        jobs = connection.execute(
            text("SELECT count(*) FROM reliable_jobs WHERE task = 'bench_receipt'")
        ).scalar()
        written = connection.execute(text("SELECT count(*) FROM orders")).scalar()
        connection.rollback()
    rel.close()
    expected = 2 * (count + 20)
    if jobs != expected or written != expected:
        raise RuntimeError(f"expected {expected} orders and jobs, found {written} and {jobs}")
    figures: dict[str, Any] = {}
    for name, values in latencies.items():
        ordered = sorted(values)
        figures[name] = {
            "orders_per_second": round(len(values) / sum(values), 1),
            "median_block_orders_per_second": round(statistics.median(blocks[name]), 1),
            "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        }
    one = figures["one_transaction"]["orders_per_second"]
    two = figures["two_transactions"]["orders_per_second"]
    figures["speedup"] = round(one / two, 2)
    return figures


def render(report: dict[str, Any]) -> str:
    lines = [
        "| database | way | orders/s | median block, orders/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for database, figures in report["results"].items():
        for way in ("one_transaction", "two_transactions"):
            f = figures[way]
            lines.append(
                f"| {database} | {way.replace('_', ' ')} | {f['orders_per_second']:,.1f} | "
                f"{f['median_block_orders_per_second']:,.1f} | {f['p50_ms']} | {f['p99_ms']} |"
            )
    for database, figures in report["results"].items():
        verdict = "meets" if figures["speedup"] >= AIM else "misses"
        lines.append(
            f"{database}: one transaction is {figures['speedup']}x two ({verdict} the {AIM}x aim)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transactions", description=__doc__)
    parser.add_argument("--orders", type=int, default=3000, help="orders per way")
    parser.add_argument("--block", type=int, default=250, help="orders per turn")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql"
    )
    args = parser.parse_args(argv)
    backends = [name.strip().lower() for name in args.backends.split(",") if name.strip()]
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": f"python -m bench.transactions {shown}".strip(),
        "orders_per_way": args.orders,
        "block": args.block,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "load_average_before": round(os.getloadavg()[0], 2),
        },
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="reliable-bench-") as scratch:
        if "sqlite" in backends:
            engine = create_engine(f"sqlite:///{Path(scratch) / 'shop.db'}")
            report["results"]["sqlite"] = measure(engine, args.orders, args.block)
            engine.dispose()
        if "postgresql" in backends:
            engine = postgres_engine(os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL))
            report["results"]["postgresql"] = measure(engine, args.orders, args.block)
            app_metadata.drop_all(engine)
            engine.dispose()
    report["machine"]["load_average_after"] = round(os.getloadavg()[0], 2)
    print(render(report))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
