"""One attempt of one job: run the task, decide what happens next.

This is where job semantics live. The worker and ``run_until_idle`` only claim jobs,
call ``run_attempt`` and hand its ``Outcome`` back to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import traceback
from collections.abc import Awaitable, Generator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import tenacity

from . import telemetry
from .aio import close_loop_resources
from .context import (
    CANCELLED,
    SHUTDOWN,
    TIMED_OUT,
    AttemptControl,
    JobContext,
    StopAttempt,
    _current,
)
from .errors import (
    DeadlineExceeded,
    NonRetriable,
    ReliableError,
    RetryAfter,
    SerializationError,
    UnknownTask,
)
from .registry import Registry
from .serialization import dumps, loads
from .steps import StepRunner, Suspend, _runner
from .store import ClaimedJob, Outcome
from .store.scopes import parse as parse_limits
from .tasks import Task

log = logging.getLogger("reliable.worker")


class AttemptTimeout(ReliableError):
    """An attempt ran longer than its task's ``timeout``."""


def error_document(exc: BaseException) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return json.dumps(
        {
            "type": name,
            "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        }
    )


def max_attempts(registry: Registry, task: Task[Any, Any]) -> int:
    retries = task.options.retries
    return 1 + (registry.runtime.settings.retries if retries is None else retries)


def timeout_of(registry: Registry, task: Task[Any, Any]) -> float | None:
    return (
        task.options.timeout
        if task.options.timeout is not None
        else registry.runtime.settings.timeout
    )


def backoff_seconds(task: Task[Any, Any], attempt: int, exc: BaseException) -> float:
    """The task's wait strategy asked as tenacity would ask it after ``attempt`` failed."""
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.outcome = tenacity.Future.construct(attempt, exc, True)
    return max(0.0, float(task.options.backoff(state)))


def failure(
    registry: Registry,
    task: Task[Any, Any] | None,
    job: ClaimedJob,
    exc: BaseException,
    *,
    retry: bool,
    delay: float | None = None,
) -> Outcome:
    """The outcome of a failed attempt: a retry while attempts remain, else ``failed``."""
    now = registry.runtime.clock.now()
    error = error_document(exc)
    limit = (
        max_attempts(registry, task) if task is not None else 1 + registry.runtime.settings.retries
    )
    counted = job.attempt - job.attempt_base  # since the last manual retry
    what = f"job {job.id} ({job.task}): attempt {counted} of {limit} failed"
    if retry and counted < limit:
        if delay is None:
            delay = backoff_seconds(task, counted, exc) if task is not None else 1.0
        at = datetime.fromtimestamp(now + delay, tz=timezone.utc).isoformat(timespec="seconds")
        log.warning("%s: %s; next attempt in %.1fs, at %s", what, _brief(exc), delay, at)
        return Outcome(
            job.id,
            job.attempt,
            "queued",
            job.started_at,
            now,
            None,
            error,
            now + delay,
            job.task,
            limits=job.limits,
        )
    reason = "no attempts left" if retry or counted >= limit else "not retried"
    log.error("%s: %s; %s, the job failed", what, _brief(exc), reason, exc_info=exc)
    return Outcome(
        job.id,
        job.attempt,
        "failed",
        job.started_at,
        now,
        None,
        error,
        task=job.task,
        limits=job.limits,
    )


def _brief(exc: BaseException) -> str:
    message = str(exc)
    if len(message) > 500:
        message = message[:500] + "..."
    return f"{type(exc).__qualname__}: {message}" if message else type(exc).__qualname__


def timed_out(registry: Registry, job: ClaimedJob, timeout: float) -> Outcome:
    """The outcome of an attempt that overran ``timeout``; its late result is discarded."""
    task = registry.tasks.get(job.task)
    exc = AttemptTimeout(f"the attempt exceeded its timeout of {timeout:g} s")
    return failure(registry, task, job, exc, retry=True)


def stopped(registry: Registry, job: ClaimedJob, reason: str, timeout: float | None) -> Outcome:
    """The outcome of an attempt that ended because it was told to stop (``reason``)."""
    now = registry.runtime.clock.now()
    if reason == TIMED_OUT and job.finish_by is not None and now >= job.finish_by:
        exc = DeadlineExceeded(
            f"the attempt was stopped at the job's finish_within deadline, {_iso(job.finish_by)}",
            option="finish_within",
            deadline=job.finish_by,
        )
        return failure(registry, registry.tasks.get(job.task), job, exc, retry=False)
    if reason == TIMED_OUT:
        return timed_out(registry, job, timeout or 0.0)
    if reason == CANCELLED:
        return Outcome(
            job.id, job.attempt, "cancelled", job.started_at, now, task=job.task, limits=job.limits
        )
    # A shutdown gives the job back, uncounted; after a lost lease the outcome is
    # discarded anyway (the job belongs to another attempt), so it says the same.
    return released(job, now)


def released(job: ClaimedJob, now: float, *, status: str = "queued") -> Outcome:
    """The outcome of an attempt given back before it ran (or stopped at shutdown): the
    job is due again at once, and the attempt does not count (``status`` ``cancelled``:
    it was cancelled before it started)."""
    return Outcome(
        job.id,
        job.attempt,
        status,
        job.started_at,
        now,
        run_at=now,
        task=job.task,
        counted=False,
        limits=job.limits,
    )


def attempt_control(registry: Registry, job: ClaimedJob) -> AttemptControl:
    """The stop signal of an attempt of ``job`` starting now, with its deadline: its
    timeout, or the job's finish deadline if that comes first."""
    task = registry.tasks.get(job.task)
    timeout = timeout_of(registry, task) if task is not None else None
    deadline = None if timeout is None else job.started_at + timeout
    if job.finish_by is not None:
        deadline = job.finish_by if deadline is None else min(deadline, job.finish_by)
    return AttemptControl(job.id, registry.runtime.clock, deadline)


def run_attempt(
    registry: Registry,
    job: ClaimedJob,
    control: AttemptControl | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> Outcome:
    """Run one attempt of ``job`` in this thread and return what should happen next.

    A coroutine the task returns runs on ``loop`` (a worker's event loop, in another
    thread), this thread waiting for it, or else on a loop of its own; the worker runs
    the attempts of ``async def`` tasks with ``run_attempt_async`` instead.

    ``control`` tells the attempt to stop (default: a control with the task's
    deadline). A function that returns after its attempt was told to stop has its
    result discarded: the outcome follows from why it was stopped.

    Deadlines: a job that had not started by its ``start_within`` deadline, or
    reaches this attempt past its ``finish_within`` one, fails without running
    (``DeadlineExceeded``, naming the deadline); a retry or a sleep that would end past
    the finish deadline fails the job instead, and an event wait ends there at the latest.
    """
    with telemetry.attempt(registry.runtime.counters, job) as ended:
        missed = missed_deadline(job)
        if missed is not None:
            outcome = failure(registry, registry.tasks.get(job.task), job, missed, retry=False)
        else:
            outcome = _drive(_attempt(registry, job, control), loop)
            if job.start_by is not None and job.task in registry.tasks:
                outcome.began = True
            outcome = within_finish(registry, job, outcome)
        ended(outcome)
    return outcome


def _iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, tz=timezone.utc).isoformat(timespec="seconds")


def missed_deadline(job: ClaimedJob) -> DeadlineExceeded | None:
    """Why ``job`` must fail instead of starting its attempt (at ``job.started_at``):
    the deadline it is past, if any."""
    now = job.started_at
    if job.start_by is not None and now > job.start_by:
        return DeadlineExceeded(
            f"the job had not started by its start_within deadline, {_iso(job.start_by)} "
            f"(it was claimed at {_iso(now)}); it did not run",
            option="start_within",
            deadline=job.start_by,
        )
    if job.finish_by is not None and now >= job.finish_by:
        return DeadlineExceeded(
            f"the job had not finished by its finish_within deadline, {_iso(job.finish_by)}"
            f" (its attempt {job.attempt} was to start at {_iso(now)}); it did not run again",
            option="finish_within",
            deadline=job.finish_by,
        )
    return None


def within_finish(registry: Registry, job: ClaimedJob, outcome: Outcome) -> Outcome:
    """``outcome``, unless it takes ``job`` past its finish deadline: a retry or a sleep
    that would end after it fails the job now; an event wait is woken at the deadline."""
    finish_by = job.finish_by
    if finish_by is None or outcome.run_at is None or outcome.run_at <= finish_by:
        return outcome
    if outcome.status == "sleeping" and outcome.waits:
        outcome.run_at = finish_by  # the event may still come in time
        return outcome
    retry = outcome.status == "queued" and outcome.counted
    if not retry and outcome.status != "sleeping":
        return outcome
    cause = ""
    if outcome.error is not None:
        error = json.loads(outcome.error)
        cause = f" (attempt {job.attempt} failed: {error.get('type')}: {error.get('message')})"
    what = "next attempt" if retry else "wake-up"
    exc = DeadlineExceeded(
        f"its {what} at {_iso(outcome.run_at)} would be past the job's finish_within "
        f"deadline, {_iso(finish_by)}{cause}",
        option="finish_within",
        deadline=finish_by,
    )
    return failure(registry, registry.tasks.get(job.task), job, exc, retry=False)


async def run_attempt_async(
    registry: Registry, job: ClaimedJob, control: AttemptControl | None = None
) -> Outcome:
    """``run_attempt`` on the running event loop: the task's coroutine is awaited here,
    beside the other async attempts of the worker. It never raises: what escapes the
    attempt (the loop closing under it) is a failure, retried."""
    with telemetry.attempt(registry.runtime.counters, job) as ended:
        missed = missed_deadline(job)
        task = registry.tasks.get(job.task)
        if missed is not None:
            outcome = failure(registry, task, job, missed, retry=False)
        else:
            try:
                outcome = await _drive_async(_attempt(registry, job, control))
            except BaseException as exc:
                outcome = failure(registry, task, job, exc, retry=True)
            if job.start_by is not None and task is not None:
                outcome.began = True
            outcome = within_finish(registry, job, outcome)
        ended(outcome)
    return outcome


# An attempt, as a generator: it yields the awaitable an ``async def`` task returned,
# and is sent its result (or thrown its exception); it returns the ``Outcome``. A thread
# (``_drive``) and the event loop (``_drive_async``) share it.
Attempt = Generator[tuple[Awaitable[Any], AttemptControl], Any, Outcome]


def _drive(attempt: Attempt, loop: asyncio.AbstractEventLoop | None) -> Outcome:
    try:
        awaitable, control = next(attempt)
        while True:
            try:
                value = run_coroutine(awaitable, control, loop)
            except BaseException as exc:  # Suspend too: the attempt decides
                awaitable, control = attempt.throw(exc)
            else:
                awaitable, control = attempt.send(value)
    except StopIteration as done:
        outcome: Outcome = done.value
        return outcome


async def _drive_async(attempt: Attempt) -> Outcome:
    try:
        awaitable, control = next(attempt)
        while True:
            try:
                value = await awaited(awaitable, control)
            except BaseException as exc:  # Suspend too: the attempt decides
                awaitable, control = attempt.throw(exc)
            else:
                awaitable, control = attempt.send(value)
    except StopIteration as done:
        outcome: Outcome = done.value
        return outcome


def _attempt(registry: Registry, job: ClaimedJob, control: AttemptControl | None) -> Attempt:
    """One attempt, deadlines aside (see ``run_attempt``)."""
    task = registry.tasks.get(job.task)
    exc: ReliableError
    if task is None:
        exc = UnknownTask(f"task {job.task!r} is not registered in this worker")
        return failure(registry, None, job, exc, retry=True)
    if job.attempt - job.attempt_base > max_attempts(registry, task):
        # The previous attempt was lost with its worker and it was the last one allowed.
        exc = ReliableError(f"no attempts left after attempt {job.attempt - 1} was lost")
        return failure(registry, task, job, exc, retry=False)

    control = control or attempt_control(registry, job)
    keys = dict(parse_limits(job.limits).keys) if job.limits else {}
    context = JobContext(job.id, task.name, job.attempt, job.queue, keys, control=control)
    token = _current.set(context)
    steps_token = _runner.set(StepRunner(registry.runtime, job, control))
    try:
        payload = loads(job.payload)
        if isinstance(payload, dict) and payload.get("captured") is not None:
            context = replace(context, captured=payload["captured"])
            _current.set(context)
        value = task.invoke(payload)
        if inspect.isawaitable(value):
            value = yield value, control
        reason = control.why()
        if reason is not None and reason != SHUTDOWN:  # it returned, but too late
            return stopped(registry, job, reason, timeout_of(registry, task))
        result = dumps(value)
    except StopAttempt as stop:
        return stopped(registry, job, stop.reason, timeout_of(registry, task))
    except Suspend as suspended:
        now = registry.runtime.clock.now()
        return Outcome(
            job.id,
            job.attempt,
            "sleeping",
            job.started_at,
            now,
            run_at=suspended.wake_at,
            task=job.task,
            counted=False,
            waits=suspended.waits,
            limits=job.limits,
        )
    except RetryAfter as exc:
        return failure(registry, task, job, exc, retry=True, delay=exc.seconds)
    except NonRetriable as exc:
        return failure(registry, task, job, exc, retry=False)
    except SerializationError as exc:
        # Storing the result (or reading the payload) will not work any better next time.
        return failure(registry, task, job, exc, retry=False)
    except Exception as exc:
        reason = control.why()
        if reason is not None and reason != SHUTDOWN:
            return stopped(registry, job, reason, timeout_of(registry, task))
        return failure(registry, task, job, exc, retry=isinstance(exc, task.options.retry_on))
    finally:
        _runner.reset(steps_token)
        _current.reset(token)
    return Outcome(
        job.id,
        job.attempt,
        "succeeded",
        job.started_at,
        registry.runtime.clock.now(),
        result,
        task=job.task,
        limits=job.limits,
    )


def run_coroutine(
    coro: Awaitable[Any], control: AttemptControl, loop: asyncio.AbstractEventLoop | None
) -> Any:
    """Run an ``async def`` task's coroutine to completion, this thread waiting for it:
    on ``loop`` (running in another thread), or else on a new loop closed after it."""
    if loop is None:
        return asyncio.run(_alone(coro, control))
    return asyncio.run_coroutine_threadsafe(awaited(coro, control), loop).result()


async def _alone(coro: Awaitable[Any], control: AttemptControl) -> Any:
    try:
        return await awaited(coro, control)
    finally:
        await close_loop_resources()


async def awaited(coro: Awaitable[Any], control: AttemptControl) -> Any:
    """Await an attempt's coroutine in the running task, named after the job (the
    watchdog names it when it blocks the loop). The task runs this attempt only.

    The coroutine is cancelled (it sees ``CancelledError``) when its deadline passes or
    its attempt is told to stop; once it has really ended, ``StopAttempt`` is raised
    with the reason (a value it returns anyway is discarded by ``_attempt``)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None, "awaited() runs in a task"
    context = _current.get()
    task.set_name(f"job {control.job_id}" + (f" ({context.task})" if context else ""))

    def cancel() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to stop
            loop.call_soon_threadsafe(task.cancel)

    control.on_stop(cancel)
    timer = None
    if control.deadline is not None:
        remaining = max(0.0, control.deadline - control.clock.now())
        timer = loop.call_later(remaining, control.stop, TIMED_OUT)
    try:
        return await coro
    except asyncio.CancelledError:
        reason = control.why()
        if reason is None:
            raise  # not by its control: the loop is closing
        if hasattr(task, "uncancel"):  # Python 3.11+: the cancel is handled here
            task.uncancel()
        raise StopAttempt(reason, control.job_id) from None
    finally:
        if timer is not None:
            timer.cancel()


def after_failure(registry: Registry, job_id: str, task_name: str) -> None:
    """Run the task's ``on_failure`` hook once the job's failure is committed."""
    task = registry.tasks.get(task_name)
    if task is None or task.options.on_failure is None:
        return
    try:
        info = registry.runtime.get_job(job_id)
        if info.status == "failed":  # not one cancelled while its last attempt ran
            task.options.on_failure(info)
    except Exception:
        log.exception("on_failure of task %s raised for job %s", task_name, job_id)
