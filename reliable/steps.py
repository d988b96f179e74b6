"""Durable steps inside a job: ``step``, ``sleep``, ``sleep_until``, ``wait_for_event``.

A job made of steps resumes where it stopped. Each step's result is committed before
the job goes on; a later attempt (after an exception, a timeout, a killed worker)
gets the stored result back instead of running the step again. ``sleep`` and
``wait_for_event`` park the job: its thread and its concurrency slots are freed, and
any worker resumes it when the time (or the event) comes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Any, NoReturn, TypeVar

from . import tracing
from .context import CANCELLED, LEASE_LOST, AttemptControl, StopAttempt, to_the_end
from .durations import Duration, parse_duration
from .errors import ReliableError
from .runtime import Runtime
from .serialization import dumps, loads
from .store import ClaimedJob
from .store.steps import StepRow, WaitRow

T = TypeVar("T")

# Far enough in the future to mean "until an event comes".
FOREVER = 253402300799.0  # 9999-12-31


class StepNameReused(ReliableError, ValueError):
    """Two steps of one job have the same name."""


class Suspend(BaseException):
    """Raised by ``sleep`` and ``wait_for_event`` to park the job until ``wake_at``.

    Derived from ``BaseException`` so that a task's ``except Exception`` does not
    swallow it.
    """

    def __init__(self, wake_at: float, *, waits: bool) -> None:
        super().__init__(wake_at)
        self.wake_at = wake_at
        self.waits = waits


@dataclass
class StepRunner:
    """The steps of the running attempt: loaded once, then kept in memory."""

    runtime: Runtime
    job: ClaimedJob
    control: AttemptControl
    done: dict[str, StepRow] | None = None
    used: set[str] = field(default_factory=set)

    def stored(self) -> dict[str, StepRow]:
        if self.done is None:
            self.done = self.runtime.store.load_steps(self.job.id)
        return self.done

    def claim_name(self, name: str) -> int:
        """A step boundary: stop here if the attempt must; else reserve ``name``."""
        self.control.check()
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError(f"a step name is 1 to 200 characters, got {name!r}")
        if name in self.used:
            raise StepNameReused(f"step name {name!r} is used twice in job {self.job.id}")
        self.used.add(name)
        return len(self.used) - 1

    def save(self, row: StepRow, wait: WaitRow | None = None) -> None:
        """Record ``row`` while the attempt holds its lease; a cancel that came
        meanwhile keeps the step (not a wait) and stops the attempt here."""
        job = self.job
        state = self.runtime.store.record_step(job.attempt, job.lease_owner, row, wait)
        if state is None:
            self.stop(LEASE_LOST)
        if wait is None or state == "running":
            self.stored()[row.name] = row
        if state == "cancelled":
            self.stop(CANCELLED)

    def stop(self, reason: str) -> NoReturn:
        self.control.stop(reason)
        raise StopAttempt(self.control.reason or reason, self.job.id)


_runner: ContextVar[StepRunner | None] = ContextVar("reliable_steps", default=None)


def _current(what: str) -> StepRunner:
    runner = _runner.get()
    if runner is None:
        raise ReliableError(f"{what}() was called outside a job")
    return runner


def _finished(runner: StepRunner, name: str) -> StepRow | None:
    row = runner.stored().get(name)
    return row if row is not None and row.status == "succeeded" else None


def _record(
    runner: StepRunner, name: str, position: int, started: float, attempts: int, **outcome: Any
) -> None:
    status = "failed" if outcome.get("error") else "succeeded"
    runner.save(
        StepRow(
            runner.job.id,
            name,
            position,
            status,
            attempts,
            outcome.get("result"),
            outcome.get("error"),
            started,
            runner.runtime.clock.now(),
        )
    )


def _previous_attempts(runner: StepRunner, name: str) -> int:
    row = runner.stored().get(name)
    return row.attempts if row is not None else 0


def step(name: str, fn: Callable[..., T], *args: Any, retries: int = 0, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` once for this job and return its result.

    The result is committed with ``name`` before the job goes on; on any later attempt
    the stored result is returned and ``fn`` is not called. A step that raised runs
    again on the next attempt. ``retries``: attempts of ``fn`` inside the step, before
    the job's own retries. For a coroutine function, ``await step(...)``.

    Raises ``StepNameReused`` for a name used twice in one job, and
    ``SerializationError`` (naming the type) for a result that cannot be stored.
    """
    runner = _current("step")
    position = runner.claim_name(name)
    if inspect.iscoroutinefunction(fn):
        return _step_async(runner, name, position, fn, args, kwargs, retries)  # type: ignore[return-value]
    done = _finished(runner, name)
    if done is not None:
        stored: T = loads(done.result or "null")
        return stored
    started = runner.runtime.clock.now()
    tries = _previous_attempts(runner, name)
    with tracing.step_span(name, runner.job.id):
        for remaining in range(retries, -1, -1):
            tries += 1
            try:
                value = fn(*args, **kwargs)
            except Exception as exc:
                if remaining:
                    continue
                _record(runner, name, position, started, tries, error=_error(exc))
                raise
            _record(runner, name, position, started, tries, result=dumps(value))
            runner.control.check()  # the step is kept; nothing after it runs
            return value
    raise AssertionError("unreachable")


async def _step_async(
    runner: StepRunner,
    name: str,
    position: int,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    retries: int,
) -> T:
    done = await to_the_end(asyncio.to_thread(_finished, runner, name))
    if done is not None:
        stored: T = loads(done.result or "null")
        return stored
    started = runner.runtime.clock.now()
    tries = _previous_attempts(runner, name)
    with tracing.step_span(name, runner.job.id):
        for remaining in range(retries, -1, -1):
            tries += 1
            try:
                value = await fn(*args, **kwargs)
            except Exception as exc:
                if remaining:
                    continue
                await to_the_end(
                    asyncio.to_thread(
                        _record, runner, name, position, started, tries, error=_error(exc)
                    )
                )
                raise
            result = dumps(value)
            record = partial(_record, runner, name, position, started, tries, result=result)
            await to_the_end(asyncio.to_thread(record))
            runner.control.check()
            return value
    raise AssertionError("unreachable")


def _error(exc: BaseException) -> str:
    return json.dumps({"type": type(exc).__qualname__, "message": str(exc)})


def sleep(name: str, duration: Duration) -> None:
    """Park the job for ``duration`` (seconds, ``timedelta`` or ``"1d"``), durably.

    The job is committed as ``sleeping``; its thread and concurrency slots are freed,
    and any worker resumes it after the delay, replaying completed steps from storage.
    """
    runner = _current("sleep")
    seconds = parse_duration(duration, name="duration")
    _sleep(runner, name, lambda: runner.runtime.clock.now() + seconds)


def sleep_until(name: str, when: datetime | float) -> None:
    """Park the job until ``when`` (an aware ``datetime``, or epoch seconds)."""
    runner = _current("sleep_until")
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError("sleep_until needs an aware datetime (with a tzinfo)")
        at = when.astimezone(timezone.utc).timestamp()
    else:
        at = float(when)
    _sleep(runner, name, lambda: at)


def _sleep(runner: StepRunner, name: str, wake_at: Callable[[], float]) -> None:
    position = runner.claim_name(name)
    row = runner.stored().get(name)
    if row is not None and row.status == "succeeded":
        return
    now = runner.runtime.clock.now()
    if row is None:
        at = wake_at()
        runner.save(
            StepRow(runner.job.id, name, position, "waiting", 1, json.dumps(at), None, now, None)
        )
    else:
        at = float(json.loads(row.result or "0"))
    if now >= at:
        _end_wait(runner, name, None, now)
        return
    raise Suspend(at, waits=False)


def _end_wait(runner: StepRunner, name: str, result: str | None, now: float) -> None:
    job = runner.job
    state = runner.runtime.store.end_wait(job.id, job.attempt, job.lease_owner, name, result, now)
    if state is None:
        runner.stop(LEASE_LOST)
    stored = runner.stored().get(name)
    if stored is not None:
        runner.stored()[name] = StepRow(
            stored.job_id,
            name,
            stored.position,
            "succeeded",
            stored.attempts,
            result,
            None,
            stored.started_at,
            now,
        )
    if state == "cancelled":
        runner.stop(CANCELLED)


def wait_for_event(
    name: str,
    event: str,
    *,
    match: dict[str, Any] | None = None,
    timeout: Duration | None = None,
) -> Any:
    """Park the job until an event named ``event`` is sent; return its data.

    ``match`` selects events by their data: ``{"order_id": 42}`` (dotted paths reach
    into nested objects). Events sent after the wait began count. Returns ``None``
    when ``timeout`` passes first.
    """
    runner = _current("wait_for_event")
    position = runner.claim_name(name)
    row = runner.stored().get(name)
    if row is not None and row.status == "succeeded":
        return None if row.result is None else loads(row.result)
    now = runner.runtime.clock.now()
    if row is None:
        expires = None if timeout is None else now + parse_duration(timeout, name="timeout")
        new = WaitRow(runner.job.id, name, event, dumps(match) if match else None, now, expires)
        runner.save(
            StepRow(runner.job.id, name, position, "waiting", 1, None, None, now, None), new
        )
        raise Suspend(FOREVER if expires is None else expires, waits=True)
    wait = runner.runtime.store.get_wait(runner.job.id, name)
    if wait is None:  # delivered between our read and now: read it again
        runner.done = None
        fresh = runner.stored().get(name)
        if fresh is not None and fresh.status == "succeeded":
            return None if fresh.result is None else loads(fresh.result)
        raise Suspend(FOREVER, waits=True)
    if wait.expires_at is not None and now >= wait.expires_at:
        _end_wait(runner, name, None, now)
        return None
    raise Suspend(FOREVER if wait.expires_at is None else wait.expires_at, waits=True)
