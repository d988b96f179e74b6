"""Enqueue in the application's own transaction (``task.options(session=...)``): the job
exists if and only if the application's transaction commits, on SQLite and PostgreSQL.

The application here is plain SQLAlchemy: its own engine, its own ``orders`` table, its
sessions; ``Reliable(engine=engine)`` shares that engine. Crashes and races across
processes use real child processes (the code they run is ``CHILD`` below).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Engine, MetaData, String, Table, create_engine, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from starlette.exceptions import StarletteDeprecationWarning
from support import LineReader, Processes

from reliable import ConfigError, JobNotFound, RateLimited, Reliable, ReliableError
from reliable.migrations import include_name, include_object

app_metadata = MetaData()
orders = Table("orders", app_metadata, Column("id", String(64), primary_key=True))


def app_engine(db_url: str) -> Engine:
    """The application's engine, made as an application makes it (not by ``reliable``)."""
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = app_engine(db_url)
    app_metadata.drop_all(engine)
    app_metadata.create_all(engine)
    yield engine
    app_metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def shared(engine: Engine) -> Iterator[Reliable]:
    """A ``Reliable`` on the application's engine, its store open (schema current)."""
    rel = Reliable(engine=engine, embedded_worker=False)
    rel.store  # noqa: B018 - opened before any transaction of the application holds a lock
    yield rel
    rel.close()


def count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        value = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
        connection.rollback()
    return int(value or 0)


def order_ids(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        rows = connection.execute(select(orders.c.id).order_by(orders.c.id)).scalars().all()
        connection.rollback()
    return list(rows)


def test_a_job_enqueued_in_a_committed_transaction_exists_from_the_commit_and_runs_once(
    shared: Reliable, engine: Engine
) -> None:
    ran: list[str] = []

    @shared.task
    def receipt(order_id: str) -> str:
        ran.append(order_id)
        return f"receipt for {order_id}"

    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-1"))
        handle = receipt.options(session=session).enqueue("o-1")
        assert handle.pending
        assert count(engine, "reliable_jobs") == 0  # nobody else sees it before the commit
        with pytest.raises(ReliableError, match="still open"):
            handle.status()
        session.commit()
    assert not handle.pending
    assert handle.status() == "queued"
    assert shared.run_until_idle() == 1
    assert shared.run_until_idle() == 0
    assert handle.result(timeout=5) == "receipt for o-1"
    assert ran == ["o-1"]
    assert order_ids(engine) == ["o-1"]


def test_a_rolled_back_transaction_leaves_no_job_no_admission_and_no_idempotency_key(
    shared: Reliable, engine: Engine
) -> None:
    @shared.task(rate_limit="1/hour", debounce="1h", key="arg:order_id")
    def receipt(order_id: str) -> str:
        return order_id

    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-1"))
        session.flush()
        rolled_back = receipt.options(session=session, idempotency_key="order-o-1").enqueue("o-1")
        assert rolled_back.created and rolled_back.pending
        session.rollback()
    with Session(engine) as session:  # the enqueue alone: its savepoint commits nothing
        alone = receipt.options(session=session, idempotency_key="alone").enqueue("o-9")
        session.rollback()
    assert not rolled_back.pending and not alone.pending
    with pytest.raises(JobNotFound):
        rolled_back.status()
    for table in (
        "orders",
        "reliable_jobs",
        "reliable_idempotency_keys",
        "reliable_rate_events",
        "reliable_debounces",
    ):
        assert count(engine, table) == 0, table
    assert all(state["used"] == 0 for state in shared.flow_state()["rate_limits"])

    # The key is free and the one admission of the hour is still there to be used.
    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-1"))
        handle = receipt.options(session=session, idempotency_key="order-o-1").enqueue("o-1")
        session.commit()
    assert handle.created and not handle.replayed
    assert handle.id != rolled_back.id
    assert count(engine, "reliable_jobs") == 1


def test_a_connection_s_transaction_carries_the_job_like_a_session_s(
    shared: Reliable, engine: Engine
) -> None:
    @shared.task
    def receipt(order_id: str) -> str:
        return order_id

    with engine.connect() as connection:
        connection.execute(insert(orders).values(id="kept"))
        kept = receipt.options(connection=connection).enqueue("kept")
        connection.commit()
        connection.execute(insert(orders).values(id="dropped"))
        dropped = receipt.options(connection=connection).enqueue("dropped")
        connection.rollback()
    assert kept.status() == "queued"
    with pytest.raises(JobNotFound):
        dropped.status()
    assert order_ids(engine) == ["kept"]

    payload = '{"args": ["raw"], "kwargs": {}}'
    with Session(engine) as session:
        session.execute(insert(orders).values(id="raw"))
        raw = shared.enqueue_payload(receipt, payload, session=session)
        session.commit()
    assert shared.run_until_idle() == 2
    assert raw.result(timeout=5) == "raw"


def test_a_refused_enqueue_leaves_the_application_s_writes_for_it_to_commit(
    shared: Reliable, engine: Engine
) -> None:
    @shared.task(rate_limit="1/hour")
    def receipt(order_id: str) -> str:
        return order_id

    receipt.enqueue("first")
    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-2"))
        with pytest.raises(RateLimited):
            receipt.options(session=session).enqueue("o-2")
        session.commit()  # the transaction is still usable: the refusal rolled back alone
    assert order_ids(engine) == ["o-2"]
    assert count(engine, "reliable_jobs") == 1
    assert count(engine, "reliable_rate_events") == 1


def test_one_idempotency_key_from_two_open_transactions_makes_one_job(
    shared: Reliable, engine: Engine
) -> None:
    """The second transaction waits for the first (PostgreSQL: on the key's row; SQLite:
    on the write lock) and gets its job; no unique violation reaches either caller."""

    @shared.task
    def receipt(order_id: str) -> str:
        return order_id

    first_enqueued = threading.Event()
    second_started = threading.Event()
    results: dict[str, Any] = {}

    def second() -> None:
        first_enqueued.wait(10)
        try:
            with Session(engine) as session:
                second_started.set()
                session.execute(insert(orders).values(id="o-b"))
                handle = receipt.options(session=session, idempotency_key="k").enqueue("same")
                session.commit()
            results["second"] = handle
        except Exception as exc:  # reported below, in the test's thread
            results["error"] = exc

    thread = threading.Thread(target=second)
    thread.start()
    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-a"))
        first = receipt.options(session=session, idempotency_key="k").enqueue("same")
        first_enqueued.set()
        assert second_started.wait(10)
        time.sleep(0.3)  # gives the second transaction time to reach the key and wait
        session.commit()
    thread.join(30)
    assert "error" not in results, results.get("error")
    assert results["second"].id == first.id
    assert results["second"].replayed and first.created
    assert count(engine, "reliable_jobs") == 1
    assert order_ids(engine) == ["o-a", "o-b"]


def test_the_embedded_worker_waits_for_the_application_s_transaction_and_runs_the_job(
    shared: Reliable, engine: Engine
) -> None:
    """While the application's transaction holds SQLite's write lock, the worker's claims
    wait for it (busy timeout) rather than fail or deadlock; the job runs after the
    commit, and may itself write to the application's tables through the same engine."""

    @shared.task
    def receipt(order_id: str) -> str:
        with engine.begin() as connection:
            connection.execute(insert(orders).values(id=f"receipt-{order_id}"))
        return order_id

    shared.start_worker(threads=2)
    try:
        receipt.enqueue("warm-up").result(timeout=30)
        with Session(engine) as session:
            session.execute(insert(orders).values(id="o-1"))
            handle = receipt.options(session=session).enqueue("o-1")
            time.sleep(0.5)  # the worker keeps polling meanwhile
            assert order_ids(engine) == ["receipt-warm-up"]  # o-1 is not committed yet
            session.commit()
        assert handle.result(timeout=30) == "o-1"
    finally:
        shared.stop_worker(timeout=10)
    assert order_ids(engine) == ["o-1", "receipt-o-1", "receipt-warm-up"]


def test_reliable_shares_the_application_s_engine_and_leaves_it_open(
    engine: Engine, db_url: str
) -> None:
    rel = Reliable(engine=engine, embedded_worker=False)
    assert rel.store.engine.pool is engine.pool
    rel.close()
    assert count(engine, "reliable_jobs") == 0  # the application's engine still works

    same = Reliable(db_url, engine=engine, embedded_worker=False)  # one database: fine
    same.close()


def test_a_session_of_another_engine_on_the_store_s_database_is_accepted(
    engine: Engine, db_url: str
) -> None:
    rel = Reliable(db_url, embedded_worker=False)  # an engine of its own
    rel.store  # noqa: B018 - opened before the application's transaction holds a lock

    @rel.task
    def receipt(order_id: str) -> str:
        return order_id

    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-1"))
        handle = receipt.options(session=session).enqueue("o-1")
        session.commit()
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=5) == "o-1"
    rel.close()


def test_an_engine_or_session_on_another_database_is_refused_naming_both(
    shared: Reliable, engine: Engine, tmp_path: Path
) -> None:
    @shared.task
    def receipt(order_id: str) -> str:
        return order_id

    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with Session(other) as session, pytest.raises(ConfigError) as refused:
        receipt.options(session=session).enqueue("o-1")
    message = str(refused.value)
    assert "other.db" in message
    assert engine.url.render_as_string(hide_password=True) in message
    other.dispose()
    assert count(engine, "reliable_jobs") == 0

    with pytest.raises(ConfigError) as mismatch:
        Reliable("postgresql://app:s3cret@db.invalid/shop", engine=engine)
    assert "s3cret" not in str(mismatch.value)
    assert "app:***@db.invalid/shop" in str(mismatch.value)
    shown = Reliable("postgresql://app:s3cret@db.invalid/shop", embedded_worker=False)
    assert "s3cret" not in repr(shown)

    with pytest.raises(ConfigError, match="not both"):
        receipt.options(session=object(), connection=object())
    with pytest.raises(ConfigError, match="Session"):
        receipt.options(session="db.session")


def test_the_alembic_filters_keep_an_application_s_autogenerate_off_reliable_s_tables(
    shared: Reliable, engine: Engine
) -> None:
    def diff(**filters: Any) -> list[Any]:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts=filters)
            found = compare_metadata(context, app_metadata)
            connection.rollback()
        return found

    unfiltered = [change[1].name for change in diff() if change[0] == "remove_table"]
    assert "reliable_jobs" in unfiltered  # what the filters are for
    assert diff(include_name=include_name) == []
    assert diff(include_object=include_object) == []


CHILD = """
import os, sys, time
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from reliable import Reliable

url = make_url(os.environ["RELIABLE_DATABASE_URL"])
if url.get_backend_name() == "postgresql":
    url = url.set(drivername="postgresql+psycopg")
engine = create_engine(url)
rel = Reliable(engine=engine, embedded_worker=False)

@rel.task(name="receipt")
def receipt(order_id):
    return order_id

rel.store
print("ready", flush=True)
for line in sys.stdin:
    command, order = line.split()
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": order})
        session.flush()
        if command == "hang":
            handle = receipt.options(session=session).enqueue(order)
            print("flushed", handle.id, flush=True)
            time.sleep(3600)
        handle = receipt.options(session=session, idempotency_key="k").enqueue("shared")
        session.commit()
    print(handle.id, handle.created, flush=True)
"""


@pytest.fixture
def processes(tmp_path: Path, db_url: str) -> Iterator[Processes]:
    with Processes(tmp_path, db_url, app="unused:rel") as started:
        yield started


def child(processes: Processes) -> tuple[subprocess.Popen[str], LineReader]:
    process = processes.start(["-c", CHILD], stdin=subprocess.PIPE)
    assert process.stdout is not None
    reader = LineReader(process.stdout)
    processes.readers.append(reader)
    assert reader.next(30, processes.logs) == "ready"
    return process, reader


def send(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(f"{line}\n")
    process.stdin.flush()


def test_a_process_killed_after_flush_and_before_commit_leaves_no_order_and_no_job(
    shared: Reliable, engine: Engine, processes: Processes
) -> None:
    process, reader = child(processes)
    send(process, "hang o-1")
    flushed, _, job_id = reader.next(30, processes.logs).partition(" ")
    assert flushed == "flushed"
    process.kill()
    process.wait(timeout=10)

    assert order_ids(engine) == []
    assert count(engine, "reliable_jobs") == 0
    with pytest.raises(JobNotFound):
        shared.job(job_id).status()
    # The dead transaction holds nothing: the next one commits (SQLite's write lock and
    # PostgreSQL's row locks went with the process).
    with Session(engine) as session:
        session.execute(insert(orders).values(id="o-1"))
        session.commit()
    assert order_ids(engine) == ["o-1"]


def test_one_idempotency_key_from_two_processes_at_once_makes_one_job(
    shared: Reliable, engine: Engine, processes: Processes
) -> None:
    """Both processes commit their order; one of them creates the job, the other gets
    it; later rounds with the key still valid create nothing more."""
    children = [child(processes) for _ in range(2)]
    created = []
    for round_ in range(3):
        for index, (process, _) in enumerate(children):  # each is blocked reading stdin
            send(process, f"dup o-{round_}-{index}")
        answers = [reader.next(60, processes.logs).split() for _, reader in children]
        assert answers[0][0] == answers[1][0], answers
        assert count(engine, "reliable_jobs") == 1
        created.append(sorted(flag for _, flag in answers))
    assert created == [["False", "True"], ["False", "False"], ["False", "False"]]
    assert len(order_ids(engine)) == 6


@pytest.fixture
def examples(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    """The example modules, imported with their module-level app on this test's
    database and without an embedded worker; forgotten afterwards."""
    url = app_engine(db_url).url.render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("RELIABLE_EMBEDDED_WORKER", "0")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    before = set(sys.modules)
    import examples.fastapi_sqlalchemy_app as fastapi_example
    import examples.flask_sqlalchemy_app as flask_example

    yield {"url": url, "flask": flask_example, "fastapi": fastapi_example}
    flask_example.rel.close()
    with flask_example.app.app_context():
        flask_example.db.engine.dispose()  # Flask-SQLAlchemy leaves its engines open
    fastapi_example.rel.close()
    fastapi_example.engine.dispose()
    for name in set(sys.modules) - before:
        if name == "examples" or name.startswith("examples."):
            del sys.modules[name]


def test_the_flask_sqlalchemy_example_commits_an_order_with_its_receipt_or_neither(
    examples: dict[str, Any],
) -> None:
    module = examples["flask"]
    rel = Reliable(embedded_worker=False)
    app = module.create_app(rel, examples["url"])
    db = module.db
    with app.app_context():
        db.drop_all()
        db.create_all()
        engine = db.engine
    assert rel.store.engine.pool is engine.pool  # one pool for the app and its jobs
    client = app.test_client()

    created = client.post("/orders", json={"email": "ada@example.com", "total_cents": 4200})
    assert created.status_code == 201, created.text
    app.testing = False  # a failing request answers 500 instead of raising here
    failed = client.post(
        "/orders", json={"email": "bob@example.com", "total_cents": 1, "fail_before_commit": 1}
    )
    assert failed.status_code == 500
    assert rel.run_until_idle() == 1
    job_id = created.get_json()["receipt_job"]
    assert rel.get_job(job_id).result == {"order_id": 1, "sent_to": "ada@example.com"}
    assert count(engine, '"order"') == 1
    assert count(engine, "receipt") == 1
    assert count(engine, "reliable_jobs") == 1
    rel.close()
    with app.app_context():
        db.drop_all()
        engine.dispose()


def test_an_offloaded_starlette_route_commits_its_job_with_what_the_request_wrote(
    engine: Engine,
) -> None:
    """``session=`` on a Starlette route: the job joins the request's session, committed
    with what an inner middleware wrote before the 202; a refused request (429) commits
    nothing of it (the middleware rolls its session back)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.types import ASGIApp, Receive, Scope, Send

    from reliable.integrations.starlette import ReliableMiddleware

    with warnings.catch_warnings():  # starlette asks for httpx2; httpx works the same here
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from starlette.testclient import TestClient

    rel = Reliable(engine=engine, embedded_worker=False)

    class SessionPerRequest:
        """The application's own: a session per request that writes the order first."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            with Session(engine) as session:
                order = dict(scope["headers"])[b"x-order"].decode()
                session.execute(insert(orders).values(id=order))
                scope.setdefault("state", {})["db"] = session
                try:
                    await self.app(scope, receive, send)
                finally:
                    session.rollback()  # what the route did not commit

    def build_report(request: Request) -> JSONResponse:
        return JSONResponse({"order": request.headers["X-Order"]}, status_code=201)

    route = rel.offload(build_report, rate_limit="1/hour", session=lambda r: r.state.db)
    app = Starlette(
        routes=[Route("/reports", route, methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel), Middleware(SessionPerRequest)],
    )
    try:
        with TestClient(app) as client:
            one_accepted_one_refused(
                lambda order: client.post("/reports", headers={"X-Order": order}), engine, rel
            )
    finally:
        rel.close()


def test_the_fastapi_sqlalchemy_example_commits_an_order_with_its_receipt(
    examples: dict[str, Any],
) -> None:
    with warnings.catch_warnings():  # starlette asks for httpx2; httpx works the same here
        warnings.simplefilter("ignore", StarletteDeprecationWarning)
        from starlette.testclient import TestClient

    module = examples["fastapi"]
    engine = app_engine(examples["url"])
    module.Base.metadata.drop_all(engine)
    module.Base.metadata.create_all(engine)
    app = module.create_app(engine, embedded_worker=True)
    try:
        with TestClient(app) as client:  # its lifespan runs the embedded worker
            created = client.post("/orders", json={"email": "ada@x.org", "total_cents": 42})
            assert created.status_code == 201, created.text
            job = app.state.reliable.job(created.json()["receipt_job"])
            assert job.result(timeout=30) == {"order_id": 1, "sent_to": "ada@x.org"}
        assert count(engine, "receipts") == 1
    finally:
        app.state.reliable.close()
        module.Base.metadata.drop_all(engine)
        engine.dispose()


def one_accepted_one_refused(post: Callable[[str], Any], engine: Engine, rel: Reliable) -> None:
    """``post(order)`` twice on a route limited to one request an hour: the first
    request's order and job are committed together, the refused one's (429) neither."""
    accepted = post("o-1")
    assert accepted.status_code == 202, accepted.text
    refused = post("o-2")
    assert refused.status_code == 429, refused.text
    assert order_ids(engine) == ["o-1"]
    assert count(engine, "reliable_jobs") == 1
    assert rel.run_until_idle() == 1
    job_id = json.loads(accepted.text)["id"]
    assert rel.get_job(job_id).result["body"] == {"order": "o-1"}


def test_an_offloaded_route_commits_its_job_with_what_the_request_wrote(
    engine: Engine,
) -> None:
    """``session=``: the job joins the request's transaction, committed before the 202;
    a refused request (429) commits nothing of it."""
    from flask import Flask, request
    from flask_sqlalchemy import SQLAlchemy

    from reliable.integrations.flask import ReliableFlask

    app = Flask("shop")
    app.config["SQLALCHEMY_DATABASE_URI"] = engine.url.render_as_string(hide_password=False)
    app.config["RELIABLE_SHARE_SQLALCHEMY_ENGINE"] = True
    app.config["RELIABLE_EMBEDDED_WORKER"] = False
    db = SQLAlchemy()
    db.init_app(app)
    rel = Reliable(embedded_worker=False)

    @app.before_request
    def note_the_request() -> None:
        db.session.execute(insert(orders).values(id=request.headers["X-Order"]))

    @app.post("/reports")
    @rel.offload(rate_limit="1/hour", session=lambda request: db.session)
    def build_report() -> tuple[dict[str, Any], int]:
        return {"order": request.headers["X-Order"]}, 201

    ReliableFlask(app, rel)
    client = app.test_client()
    one_accepted_one_refused(
        lambda order: client.post("/reports", headers={"X-Order": order}), engine, rel
    )
    rel.close()
    with app.app_context():
        db.engine.dispose()
