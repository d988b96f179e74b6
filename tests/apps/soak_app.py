"""The application of the chaos soak (``tests/soak``): jobs of three steps under a cap.

Workers load it with ``reliable worker tests.apps.soak_app:rel``; the database comes
from ``RELIABLE_DATABASE_URL``. Everything a job does is also written outside the store,
to ``<pid>.log`` in the folder ``SOAK_APP_RECORDS``, one line per event, so that a
checker can tell what really ran without trusting the store:

- ``step JOB STEP ATTEMPT PID TOKEN AT``: the function of a step began (``AT`` is
  ``time.time()``); it returns ``TOKEN``, a fresh random string, which the store keeps
  as the step's result: the stored token names the one execution that completed it.
- ``start JOB ATTEMPT ACCOUNT AT`` and ``end JOB ATTEMPT ACCOUNT AT``: an attempt of
  ``soak_job`` (capped at 2 per account) began and returned (or raised). A process
  killed in between leaves no ``end``.
- ``probe JOB PID AT``: an attempt of ``probe`` began (wake-up latency).

One ``os.write`` of a short line to a file opened with ``O_APPEND`` is atomic, so a
process killed by SIGKILL leaves whole lines; nothing here touches the database except
through ``reliable``.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import tenacity

from reliable import Concurrency, Reliable, current_job, step

RECORDS_ENV = "SOAK_APP_RECORDS"
STEPS = ("one", "two", "three")
CAP = 2

rel = Reliable()


def record(*fields: object) -> None:
    """Append one line to this process's record file (see ``SOAK_APP_RECORDS``)."""
    folder = os.environ.get(RECORDS_ENV)
    if not folder:
        return
    line = " ".join(str(field) for field in fields) + "\n"
    descriptor = os.open(
        Path(folder, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def side_effect(name: str, seconds: float) -> str:
    """A step's function: record that it ran, work ``seconds`` (a sleep: the machine's
    cores are for the workers), return a fresh token."""
    job = current_job()
    token = secrets.token_hex(8)
    record("step", job.id, name, job.attempt, os.getpid(), token, f"{time.time():.6f}")
    time.sleep(seconds)
    return token


# Attempts lost to kills and database restarts count against retries: allow many, and
# come back quickly (the soak measures correctness, not patience).
@rel.task(
    concurrency=Concurrency(CAP, key="arg:account"),
    retries=10_000,
    backoff=tenacity.wait_random(0.05, 0.3),
)
def soak_job(n: int, account: str, seconds: float = 0.005) -> list[str]:
    """Three steps of ``seconds`` each; returns their tokens. At most ``CAP`` attempts
    per account at once."""
    job = current_job()
    record("start", job.id, job.attempt, account, f"{time.time():.6f}")
    try:
        return [step(name, side_effect, name, seconds) for name in STEPS]
    finally:
        record("end", job.id, job.attempt, account, f"{time.time():.6f}")


@rel.task(retries=100, backoff=tenacity.wait_fixed(0.1))
def probe(n: int) -> int:
    """Records when its attempt began; the soak enqueues it while workers are idle."""
    record("probe", current_job().id, os.getpid(), f"{time.time():.6f}")
    return n
