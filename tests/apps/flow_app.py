"""An application for tests of flow control and durable steps in real worker processes.

Workers load it with ``reliable worker tests.apps.flow_app:rel``; the database comes
from ``RELIABLE_DATABASE_URL``.

- ``capped``, ``per_tenant``: attempts under concurrency caps. Each attempt appends
  ``start`` and ``end`` lines (task, key, job id, attempt, ``time.time()``) to
  ``<pid>.log`` in the folder ``FLOW_APP_SPANS``; one ``os.write`` of a short line to a
  file opened with ``O_APPEND`` is atomic, so a killed process leaves whole lines.
  ``capped`` can wait for a file (``gate=``) first, so a test can kill its worker
  while it holds both slots.
- ``limited``: a rate-limited task, enqueued by this module run as a producer.
- ``three_steps``, ``sleeper``, ``waiter``: durable steps, ``sleep``,
  ``wait_for_event``. Every execution of a step's function adds a row to
  ``step_runs`` (job id, step, pid, time), so a test counts how often each ran.
  ``three_steps`` can pause (``pause="inside"`` step two, or ``"between"`` steps two
  and three): it touches ``<job id>.<pause>`` in ``FLOW_APP_GATES`` and waits for
  ``<job id>.go`` there, so a test can kill its worker at that point.

Run as a module (``python -m tests.apps.flow_app SECONDS``) it is a producer: it
prints ``{"limit": N, "period": P}`` once the database is open, waits for a line on
stdin, then enqueues ``limited`` as fast as it is admitted for ``SECONDS`` and prints
``{"accepted": [job ids], "refused": count}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Double, Integer, MetaData, String, Table, text

from reliable import (
    Concurrency,
    RateLimited,
    Reliable,
    current_job,
    sleep,
    step,
    wait_for_event,
)

SPANS_ENV = "FLOW_APP_SPANS"
GATES_ENV = "FLOW_APP_GATES"
# How long a paused job waits for its gate before going on regardless.
GATE_SECONDS = 60.0
# Serialises creating the table across processes on PostgreSQL (an arbitrary lock id).
_DDL_LOCK = 0x666C6F77

rel = Reliable()

metadata = MetaData()
step_runs = Table(
    "step_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False),
    Column("step", String(50), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("at", Double, nullable=False),
)


def create_tables() -> None:
    """Create ``step_runs`` unless it exists; processes starting together may race."""
    with rel.store.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _DDL_LOCK})
        metadata.create_all(connection, checkfirst=True)


def write_span(event: str, key: str) -> None:
    """Append one ``start``/``end`` line for this attempt (see ``FLOW_APP_SPANS``)."""
    folder = os.environ.get(SPANS_ENV)
    if not folder:
        return
    job = current_job()
    line = f"{event} {job.task} {key} {job.id} {job.attempt} {time.time():.6f}\n"
    descriptor = os.open(
        Path(folder, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def run_span(key: str, seconds: float, gate: str = "") -> None:
    """The body of a capped attempt: recorded from its start to its end."""
    write_span("start", key)
    wait_for_file(Path(gate) if gate else None)
    time.sleep(seconds)
    write_span("end", key)


def wait_for_file(path: Path | None) -> None:
    """Wait until ``path`` exists, at most ``GATE_SECONDS`` (``None``: do not wait)."""
    deadline = time.monotonic() + GATE_SECONDS
    while path is not None and not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


@rel.task(concurrency=2)
def capped(n: int, seconds: float = 0.08, gate: str = "") -> int:
    """At most two attempts at once in all; each waits for the file ``gate`` (if
    given), then works ``seconds``."""
    run_span("*", seconds, gate)
    return n


@rel.task(concurrency=Concurrency(2, key="arg:tenant"))
def per_tenant(tenant: str, n: int, seconds: float = 0.08) -> int:
    """At most two attempts at once per tenant; each works ``seconds``."""
    run_span(tenant, seconds)
    return n


@rel.task(rate_limit="20/second")
def limited(n: int) -> int:
    """Admitted at most 20 times per sliding second."""
    return n


def count_run(name: str) -> None:
    """Record one execution of the step ``name`` of the current job."""
    with rel.store.engine.begin() as connection:
        connection.execute(
            step_runs.insert().values(
                job_id=current_job().id, step=name, pid=os.getpid(), at=time.time()
            )
        )


def hold(where: str) -> None:
    """Tell the test this job reached ``where``, then wait for its gate (bounded)."""
    folder = Path(os.environ[GATES_ENV])
    job_id = current_job().id
    (folder / f"{job_id}.{where}").touch()
    wait_for_file(folder / f"{job_id}.go")


def first_step(n: int) -> int:
    count_run("one")
    return n * 10


def second_step(value: int, pause: str) -> int:
    count_run("two")
    if pause == "inside":
        hold("inside")
    return value + 1


def third_step(value: int) -> int:
    count_run("three")
    return value * 2


@rel.task(retries=3)
def three_steps(n: int, pause: str = "") -> int:
    """``(n * 10 + 1) * 2``, one step at a time; may pause inside or after step two."""
    first = step("one", first_step, n)
    second = step("two", second_step, first, pause)
    if pause == "between":
        hold("between")
    return step("three", third_step, second)


@rel.task(concurrency=1)
def sleeper(n: int, seconds: float) -> int:
    """A step, a durable ``sleep`` of ``seconds`` (its slot freed), another step."""
    step("before", count_run, "before")
    sleep("nap", seconds)
    step("after", count_run, "after")
    return n


@rel.task
def waiter(order_id: int) -> Any:
    """The data of the first ``payment.received`` event for ``order_id``."""
    return wait_for_event("paid", "payment.received", match={"order_id": order_id})


def produce(seconds: float) -> None:
    """Enqueue ``limited`` for ``seconds`` once told to start; report what was admitted."""
    rate = limited.options.flow.rate_limits[0]
    print(json.dumps({"limit": rate.limit, "period": rate.period}), flush=True)
    sys.stdin.readline()
    accepted: list[str] = []
    refused = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            accepted.append(limited.enqueue(len(accepted)).id)
        except RateLimited:
            refused += 1
            time.sleep(0.005)  # keep asking, but leave the machine to the others
    print(json.dumps({"accepted": accepted, "refused": refused}), flush=True)
    rel.close()


create_tables()

if __name__ == "__main__":
    produce(float(sys.argv[1]))
