"""``task.enqueue_many(...)``: a batch of jobs written in one transaction, all of it or
none, with idempotency keys honoured within the batch and against earlier jobs, on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from reliable import (
    ConfigError,
    IdempotencyConflict,
    JobNotFound,
    RateLimited,
    Reliable,
    SerializationError,
    StoreError,
)
from reliable.clock import ManualClock


def count(rel: Reliable | Engine, table: str) -> int:
    """Rows of ``table``: through the store's engine, or an application's (whose reads
    wait for no write lock)."""
    engine = rel if isinstance(rel, Engine) else rel.store.engine
    with engine.connect() as connection:
        value = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
        connection.rollback()
    return int(value or 0)


def test_a_batch_is_stored_at_once_and_each_job_runs_with_its_own_arguments(
    rel: Reliable,
) -> None:
    ran: list[tuple[int, str]] = []

    @rel.task
    def ship(order: int, carrier: str = "post") -> str:
        ran.append((order, carrier))
        return f"{order} by {carrier}"

    calls = [(i,) for i in range(200)] + [{"order": 200, "carrier": "van"}, (201, "bike")]
    handles = ship.enqueue_many(calls)

    assert len(handles) == 202
    assert len({handle.id for handle in handles}) == 202
    assert all(handle.created and not handle.replayed for handle in handles)
    assert count(rel, "reliable_jobs") == 202
    assert handles[0].status() == "queued"
    assert rel.run_until_idle() == 202
    assert sorted(ran) == sorted([(i, "post") for i in range(200)] + [(200, "van"), (201, "bike")])
    # Handles follow the order of the calls.
    assert handles[0].result(timeout=5) == "0 by post"
    assert handles[200].result(timeout=5) == "200 by van"
    assert handles[201].result(timeout=5) == "201 by bike"


def test_an_empty_batch_stores_nothing(rel: Reliable) -> None:
    @rel.task
    def ship(order: int) -> None: ...

    assert ship.enqueue_many([]) == []
    assert count(rel, "reliable_jobs") == 0


def test_a_key_repeated_within_the_batch_makes_one_job(rel: Reliable) -> None:
    @rel.task
    def charge(invoice: int) -> int:
        return invoice

    handles = charge.enqueue_many(
        [(1,), (2,), (1,), (3,)], idempotency_keys=["inv-1", "inv-2", "inv-1", None]
    )

    assert [h.created for h in handles] == [True, True, False, True]
    assert handles[2].replayed and handles[2].id == handles[0].id
    assert count(rel, "reliable_jobs") == 3
    assert rel.run_until_idle() == 3
    assert handles[2].result(timeout=5) == 1


def test_keys_already_used_give_the_earlier_jobs(rel: Reliable) -> None:
    @rel.task
    def charge(invoice: int) -> int:
        return invoice

    first = charge.enqueue(1, idempotency_key="inv-1")
    handles = charge.enqueue_many([(1,), (2,)], idempotency_keys=["inv-1", "inv-2"])

    assert handles[0].id == first.id and handles[0].replayed and not handles[0].created
    assert handles[1].created
    assert count(rel, "reliable_jobs") == 2
    # The batch's keys hold against later single enqueues too.
    again = charge.enqueue(2, idempotency_key="inv-2")
    assert again.id == handles[1].id and again.replayed


def test_the_task_idempotency_key_function_is_honoured(rel: Reliable) -> None:
    @rel.task(idempotency_key=lambda invoice: f"inv-{invoice}")
    def charge(invoice: int) -> int:
        return invoice

    handles = charge.enqueue_many([(1,), (2,), (1,)])
    assert handles[2].id == handles[0].id and handles[2].replayed
    assert count(rel, "reliable_jobs") == 2


def test_a_key_reused_with_other_arguments_stores_nothing_of_the_batch(rel: Reliable) -> None:
    @rel.task
    def charge(invoice: int) -> int:
        return invoice

    earlier = charge.enqueue(1, idempotency_key="inv-1")
    with pytest.raises(IdempotencyConflict) as raised:
        charge.enqueue_many([(5,), (99,), (6,)], idempotency_keys=["inv-5", "inv-1", "inv-6"])
    assert raised.value.key == "inv-1" and raised.value.job_id == earlier.id
    assert count(rel, "reliable_jobs") == 1
    assert count(rel, "reliable_idempotency_keys") == 1  # inv-5 and inv-6 were not kept

    # Within the batch itself: the second use of a key with other arguments.
    with pytest.raises(IdempotencyConflict):
        charge.enqueue_many([(7,), (8,)], idempotency_keys=["inv-7", "inv-7"])
    assert count(rel, "reliable_jobs") == 1
    # The keys are free: the same batch, consistent, goes in.
    handles = charge.enqueue_many([(5,), (6,)], idempotency_keys=["inv-5", "inv-6"])
    assert all(handle.created for handle in handles)


def test_one_bad_call_stores_nothing_and_names_the_call(rel: Reliable) -> None:
    @rel.task
    def ship(order: int) -> None: ...

    with pytest.raises(TypeError, match="nothing was stored"):
        ship.enqueue_many([(1,), (2, 3)])
    with pytest.raises(SerializationError, match="'order'"):
        ship.enqueue_many([(1,), (object(),)])
    with pytest.raises(TypeError, match=r"call #1 of enqueue_many is int.*\(value,\)"):
        ship.enqueue_many([(1,), 2])  # type: ignore[list-item]
    assert count(rel, "reliable_jobs") == 0


def test_options_that_cannot_apply_to_a_batch_are_refused_clearly(rel: Reliable) -> None:
    @rel.task
    def ship(order: int) -> None: ...

    with pytest.raises(ConfigError, match="idempotency_keys=") as raised:
        ship.options(idempotency_key="one").enqueue_many([(1,), (2,)])
    assert raised.value.name == "idempotency_key"
    with pytest.raises(ConfigError, match="2 keys") as raised:
        ship.enqueue_many([(1,), (2,)], idempotency_keys=["only-one"])
    assert raised.value.name == "idempotency_keys"
    assert count(rel, "reliable_jobs") == 0


def test_call_options_apply_to_every_job_of_the_batch(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(queue="mail")
    def ship(order: int) -> int:
        return order

    handles = ship.options(delay="10m", priority=5, queue="urgent").enqueue_many([(1,), (2,)])
    jobs = [handle.info() for handle in handles]
    assert all(job.queue == "urgent" and job.priority == 5 for job in jobs)
    assert rel.run_until_idle(["urgent"]) == 0  # not due yet
    clock.advance(601)
    assert rel.run_until_idle(["urgent"]) == 2


def test_a_rate_limit_admits_the_whole_batch_or_none_of_it(rel: Reliable) -> None:
    @rel.task(rate_limit="3/minute")
    def notify(user: int) -> None: ...

    with pytest.raises(RateLimited):
        notify.enqueue_many([(1,), (2,), (3,), (4,)])
    assert count(rel, "reliable_jobs") == 0
    assert count(rel, "reliable_rate_events") == 0  # the three admissions rolled back

    handles = notify.enqueue_many([(1,), (2,), (3,)])
    assert all(handle.created for handle in handles)
    with pytest.raises(RateLimited):
        notify.enqueue(4)


def test_debounced_calls_of_a_batch_collapse_into_one_job(rel: Reliable) -> None:
    @rel.task(debounce="1m", key="arg:user")
    def sync(user: int, note: str) -> str:
        return note

    handles = sync.enqueue_many([(1, "a"), (2, "b"), (1, "c")])
    assert handles[2].id == handles[0].id and handles[1].id != handles[0].id
    assert count(rel, "reliable_jobs") == 2


def test_concurrency_keys_are_resolved_per_call(rel: Reliable) -> None:
    @rel.task(concurrency=1, key="arg:user")
    def sync(user: int) -> int:
        return user

    handles = sync.enqueue_many([(1,), (2,), (1,)])
    assert rel.run_until_idle() == 3
    assert [handle.result(timeout=5) for handle in handles] == [1, 2, 1]


# -- in the application's transaction --------------------------------------------------


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def shared(engine: Engine) -> Iterator[Reliable]:
    rel = Reliable(engine=engine, embedded_worker=False)
    rel.store  # noqa: B018 - opened (schema current) before a session holds a lock
    yield rel
    rel.close()


def test_a_batch_in_a_rolled_back_transaction_leaves_nothing(
    shared: Reliable, engine: Engine
) -> None:
    @shared.task
    def ship(order: int) -> None: ...

    with Session(engine) as session:
        handles = ship.options(session=session).enqueue_many(
            [(1,), (2,)], idempotency_keys=["o-1", "o-2"]
        )
        assert all(handle.pending for handle in handles)
        assert count(engine, "reliable_jobs") == 0  # nobody sees them before the commit
        session.rollback()
    assert not any(handle.pending for handle in handles)
    with pytest.raises(JobNotFound):
        handles[0].status()
    assert count(engine, "reliable_jobs") == 0
    assert count(engine, "reliable_idempotency_keys") == 0


def test_a_batch_in_a_committed_transaction_exists_from_the_commit(
    shared: Reliable, engine: Engine
) -> None:
    @shared.task
    def ship(order: int) -> int:
        return order

    with Session(engine) as session:
        handles = ship.options(session=session).enqueue_many([(1,), (2,), (3,)])
        session.commit()
    assert not any(handle.pending for handle in handles)
    assert [handle.status() for handle in handles] == ["queued"] * 3
    assert shared.run_until_idle() == 3
    assert [handle.result(timeout=5) for handle in handles] == [1, 2, 3]


def test_a_refused_batch_leaves_the_callers_own_writes(shared: Reliable, engine: Engine) -> None:
    @shared.task
    def ship(order: int) -> None: ...

    earlier = ship.enqueue(1, idempotency_key="o-1")
    with Session(engine) as session:
        first = ship.options(session=session).enqueue_many([(5,)])
        with pytest.raises(IdempotencyConflict):
            ship.options(session=session).enqueue_many(
                [(6,), (2,)], idempotency_keys=["o-6", "o-1"]
            )
        session.commit()
    assert first[0].status() == "queued"
    assert earlier.status() == "queued"
    assert count(engine, "reliable_jobs") == 2


# -- producers enqueueing at the same time (committed together on SQLite) ---------------


def poison(rel: Reliable, word: str) -> None:
    """Make the database refuse any job whose payload holds ``word`` (a trigger)."""
    with rel.store.engine.begin() as connection:
        if rel.store.dialect == "sqlite":
            connection.exec_driver_sql(
                "CREATE TRIGGER reliable_test_poison BEFORE INSERT ON reliable_jobs"
                f" WHEN instr(NEW.payload, '{word}') > 0"
                " BEGIN SELECT RAISE(ABORT, 'poisoned payload'); END"
            )
        else:
            connection.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION reliable_test_poison() RETURNS trigger AS $$"
                f" BEGIN IF strpos(NEW.payload, '{word}') > 0 THEN"
                " RAISE EXCEPTION 'poisoned payload'; END IF; RETURN NEW; END $$"
                " LANGUAGE plpgsql"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER reliable_test_poison BEFORE INSERT ON reliable_jobs"
                " FOR EACH ROW EXECUTE FUNCTION reliable_test_poison()"
            )


@pytest.fixture
def producers_app(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False)
    yield app
    if app.store.dialect == "postgresql":
        with app.store.engine.begin() as connection:
            connection.exec_driver_sql(
                "DROP TRIGGER IF EXISTS reliable_test_poison ON reliable_jobs"
            )
            connection.exec_driver_sql("DROP FUNCTION IF EXISTS reliable_test_poison()")
    app.close()


def test_concurrent_producers_each_get_a_stored_job_or_an_error_and_nothing(
    producers_app: Reliable,
) -> None:
    rel = producers_app

    @rel.task
    def note(text: str) -> str:
        return text

    poison(rel, "poison")
    outcomes: dict[str, object] = {}
    lock = threading.Lock()

    def produce(thread: int) -> None:
        for i in range(40):
            text = "poison" if (thread, i) == (2, 20) else f"t{thread}-{i}"
            try:
                outcome: object = note.enqueue(text).id
            except StoreError as exc:
                outcome = exc
            with lock:
                outcomes[text] = outcome

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert len(outcomes) == 240

    assert isinstance(outcomes["poison"], StoreError)
    assert "poisoned payload" in str(outcomes["poison"])
    stored = {job_id for job_id in outcomes.values() if isinstance(job_id, str)}
    refused = [text for text, outcome in outcomes.items() if isinstance(outcome, StoreError)]
    with rel.store.engine.connect() as connection:
        rows = connection.execute(text("SELECT id, payload FROM reliable_jobs")).all()
        connection.rollback()
    # Every enqueue that returned is stored; none that raised is, not even in part.
    assert {row.id for row in rows} == stored
    payloads = " ".join(row.payload for row in rows)
    assert all(f'"{text}"' not in payloads for text in refused)
    assert len(rows) + len(refused) == 240
