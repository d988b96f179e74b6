"""The applications that ``python -m bench.http`` serves, one per framework.

Each app has two routes that take the same small JSON body and write one row to the
same database:

- ``POST /offload/orders/<id>``: ``@rel.offload``; answers 202 once the job is
  committed. No worker runs in the benchmark (``RELIABLE_EMBEDDED_WORKER=0``), so
  the jobs just accumulate;
- ``POST /plain/orders/<id>``: parses the body and INSERTs one row into
  ``bench_http_orders`` through SQLAlchemy Core on a pooled engine, one transaction per
  request, with reliable's durability settings (SQLite: WAL, ``synchronous`` as
  ``RELIABLE_SQLITE_SYNCHRONOUS``, default FULL, ``BEGIN IMMEDIATE``); answers 201.

``GET /health`` answers the serving process's id, so the benchmark can tell when every
server process is up. The database comes from ``BENCH_HTTP_DATABASE_URL``; the plain
engine's pool size from ``BENCH_HTTP_POOL_SIZE``. The factories are served as
``gunicorn 'bench.http_apps:flask_app()'`` and ``uvicorn --factory
bench.http_apps:starlette_app``; each imports only its own framework.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url

from reliable import Reliable, Settings
from reliable.store.sqlite import BUSY_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from flask import Flask
    from starlette.applications import Starlette

DATABASE_URL_ENV = "BENCH_HTTP_DATABASE_URL"
POOL_SIZE_ENV = "BENCH_HTTP_POOL_SIZE"
DEFAULT_POOL_SIZE = 8

OFFLOAD_PATH = "/offload/orders"
PLAIN_PATH = "/plain/orders"
HEALTH_PATH = "/health"

metadata = MetaData()

# The plain route's table: a row the size and shape of a small order, as an app keeps it.
orders = Table(
    "bench_http_orders",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("order_id", Integer, nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Index("ix_bench_http_orders_created", "created_at"),
)
_INSERT_ORDER = orders.insert()


def database_url() -> str:
    """The benchmark's database, from ``BENCH_HTTP_DATABASE_URL``."""
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise RuntimeError(f"{DATABASE_URL_ENV} is not set")
    return url


def plain_engine(url: str, pool_size: int | None = None) -> Engine:
    """A pooled engine for the plain route, with reliable's durability settings.

    SQLite: WAL, ``synchronous`` as reliable's setting (default FULL), the same busy
    timeout, and every transaction begins with ``BEGIN IMMEDIATE``. PostgreSQL:
    psycopg 3, the server's default durability (``synchronous_commit``).
    """
    size = pool_size or int(os.environ.get(POOL_SIZE_ENV, DEFAULT_POOL_SIZE))
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            parsed.set(drivername="postgresql+psycopg"), pool_size=size, max_overflow=size
        )
    # Validated by Settings to FULL or NORMAL: a PRAGMA value cannot be a bound parameter.
    synchronous = Settings.load().sqlite_synchronous
    engine = create_engine(
        parsed,
        connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        pool_size=size,
        max_overflow=size,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions begin in "begin" below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.connection.driver_connection.execute("BEGIN IMMEDIATE")

    return engine


def record_order(engine: Engine, order_id: int, data: Any) -> str:
    """The plain route's work: one INSERT in its own transaction; returns the row's id."""
    row_id = uuid.uuid4().hex
    payload = json.dumps(data, separators=(",", ":"))
    with engine.begin() as connection:
        connection.execute(
            _INSERT_ORDER,
            {"id": row_id, "order_id": order_id, "payload": payload, "created_at": time.time()},
        )
    return row_id


def bench_reliable(url: str) -> Reliable:
    """The ``Reliable`` of a benchmark app: no embedded worker, whatever the environment."""
    return Reliable(database_url=url, embedded_worker=False)


def flask_app() -> Flask:
    """The Flask app: ``ReliableFlask``, the offloaded and the plain route, ``/health``."""
    from flask import Flask, request

    from reliable.integrations.flask import ReliableFlask

    url = database_url()
    rel = bench_reliable(url)
    engine = plain_engine(url)
    app = Flask(__name__)

    @app.post(f"{OFFLOAD_PATH}/<int:order_id>")
    @rel.offload
    def offloaded(order_id: int) -> tuple[dict[str, Any], int]:
        """In a worker (none runs here): store the order as the plain route does."""
        row_id = record_order(engine, order_id, request.get_json())
        return {"id": row_id, "status": "stored"}, 201

    @app.post(f"{PLAIN_PATH}/<int:order_id>")
    def plain(order_id: int) -> tuple[dict[str, Any], int]:
        """Store the order now, in the request."""
        row_id = record_order(engine, order_id, request.get_json())
        return {"id": row_id, "status": "stored"}, 201

    @app.get(HEALTH_PATH)
    def health() -> dict[str, Any]:
        return {"pid": os.getpid()}

    ReliableFlask(app, rel)
    return app


def starlette_app() -> Starlette:
    """The Starlette app: ``ReliableMiddleware``, both routes, ``/health``.

    Both endpoints are ``async``: the offloaded one commits its job in a worker thread
    (the adapter's one hop), and the plain one runs its blocking INSERT in one too.
    """
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from reliable.integrations.starlette import ReliableMiddleware

    url = database_url()
    rel = bench_reliable(url)
    engine = plain_engine(url)

    async def offloaded(request: Request) -> JSONResponse:
        """In a worker (none runs here): store the order as the plain route does."""
        order_id: int = request.path_params["order_id"]
        data = await request.json()
        row_id = await anyio.to_thread.run_sync(record_order, engine, order_id, data)
        return JSONResponse({"id": row_id, "status": "stored"}, status_code=201)

    async def plain(request: Request) -> JSONResponse:
        """Store the order now, in the request."""
        order_id: int = request.path_params["order_id"]
        data = await request.json()
        row_id = await anyio.to_thread.run_sync(record_order, engine, order_id, data)
        return JSONResponse({"id": row_id, "status": "stored"}, status_code=201)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid()})

    routes = [
        Route(f"{OFFLOAD_PATH}/{{order_id:int}}", rel.offload(offloaded), methods=["POST"]),
        Route(f"{PLAIN_PATH}/{{order_id:int}}", plain, methods=["POST"]),
        Route(HEALTH_PATH, health, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(ReliableMiddleware, reliable=rel)])
