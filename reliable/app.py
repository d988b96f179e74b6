"""``Reliable``: the façade of one application: its tasks and routes, its jobs, its workers.

Built on a ``Registry`` (the tasks) and its ``Runtime`` (settings, clock, store); the
parts underneath receive those, and never this class."""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from .aio import LoopResource
from .calls import EnqueueOptions
from .clock import Clock, SystemClock
from .durations import Duration, parse_duration
from .errors import ConfigError
from .execution import after_failure, attempt_control, run_attempt
from .handles import JobHandle
from .jobs import AttemptInfo, JobInfo, StepInfo
from .limits import FlowPlan
from .operations import Operations
from .retention import finished_statuses, purge
from .runtime import Runtime, StatusAccess
from .schedules import Schedule, ScheduleInfo, Timetable
from .serialization import dumps
from .settings import Settings
from .store import Store
from .store.database import masked_url, shared_engine_url
from .tasks import Task, TaskOptions
from .web.routes import offload as offload_route
from .worker import Worker, new_worker_id

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("reliable")


class Reliable(Operations):
    """Durable execution for one application.

    Every setting (see ``Settings``) comes from its ``RELIABLE_*`` environment variable
    unless passed here; a bad value raises ``ConfigError`` naming the variable.

    >>> rel = Reliable(database_url="sqlite:///jobs.db")
    >>> @rel.task(retries=3)
    ... def send_invoice(order_id: int) -> dict: ...

    ``clock`` replaces the wall clock (tests move time by hand). The database is opened
    on first use and its schema upgraded then, unless ``auto_migrate`` is off
    (``RELIABLE_AUTO_MIGRATE=0``): then an outdated schema raises ``StoreError`` asking
    for ``reliable db upgrade``.

    ``engine``: the application's SQLAlchemy ``Engine`` (``Reliable(engine=db.engine)``):
    the job store lives in its database and uses its connection pool instead of a
    second one (``database_url``, if given too, must name the same database); see
    docs/transactions.md. The store is opened, and its schema upgraded, here (unless
    ``auto_migrate`` is off). Raises ``ConfigError`` naming ``engine`` otherwise.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        engine: Any = None,
        clock: Clock | None = None,
        auto_migrate: bool | None = None,
        **settings: Any,
    ) -> None:
        if engine is not None:
            database_url = shared_engine_url(engine, database_url)
        runtime = Runtime(
            Settings.load({"database_url": database_url, "auto_migrate": auto_migrate, **settings}),
            clock or SystemClock(),
        )
        runtime.engine = engine
        super().__init__(runtime)
        if engine is not None:
            self._open_shared_store()
        self._lock = threading.RLock()
        self._worker: Worker | None = None
        self._inline_worker_id = new_worker_id()
        self.timetable = Timetable(runtime)  # the cron schedules (``cron``)

    def __repr__(self) -> str:
        return f"<Reliable {masked_url(self.settings.database_url)}>"

    def use_engine(self, engine: Any) -> None:
        """Move the job store to the application's SQLAlchemy ``engine`` (its database
        and its pool), as ``Reliable(engine=...)`` does; ``ReliableFlask`` calls it with
        Flask-SQLAlchemy's engine when asked. Raises ``ConfigError`` naming ``engine``
        for something else than an engine, or once the store is open on another one.
        """
        url = shared_engine_url(engine, None)
        runtime = self.runtime
        if runtime.engine is engine:
            return
        if runtime._store is not None:
            raise ConfigError(
                "engine",
                "the job store is already open on its own engine: share the application's "
                "engine before the first job is enqueued (Reliable(engine=...))",
            )
        runtime.settings = dataclasses.replace(runtime.settings, database_url=url)
        runtime.engine = engine
        self._open_shared_store()

    def _open_shared_store(self) -> None:
        # Upgraded now, not at the first enqueue: that may come inside a transaction
        # of the application's that holds SQLite's write lock, which the migrations
        # would wait for in vain. Without auto_migrate the schema is only read (no lock).
        if self.settings.auto_migrate:
            self.runtime.store  # noqa: B018

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def clock(self) -> Clock:
        return self.runtime.clock

    @property
    def store(self) -> Store:
        """The job store, opened (and its schema upgraded) on first use."""
        return self.runtime.store

    @property
    def capture_hook(self) -> Callable[[Any], Any] | None:
        return self.runtime.capture_hook

    @property
    def status_hook(self) -> StatusAccess | None:
        return self.runtime.status_hook

    # -- tasks --------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, /, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self, fn: Callable[P, R] | None = None, /, **options: Any
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Mark a function as a task: ``@rel.task`` or ``@rel.task(retries=5, ...)``.

        Options: ``name`` (default: the function's name), ``retries`` (attempts after the
        first; default ``RELIABLE_RETRIES``), ``backoff`` (a tenacity wait strategy),
        ``retry_on`` (exception types retried; default ``Exception``), ``timeout``
        (seconds or ``"2m"`` per attempt; default ``RELIABLE_TIMEOUT``), ``queue``,
        ``priority`` (higher first), ``idempotency_key`` (a function of the arguments),
        ``on_failure`` (called once with the ``JobInfo`` when the job fails for good),
        ``start_within`` (a job not started this long after it is due fails without
        running), ``finish_within`` (a job not finished this long after it is due,
        retries and sleeps included, fails). Per call: ``task.options(...).enqueue()``.

        Raises ``ConfigError`` naming a bad option, or a name already taken.
        """

        def decorate(function: Callable[P, R]) -> Task[P, R]:
            task = Task(self.runtime, function, TaskOptions.build(function, **options))
            self.register(task)
            return task

        return decorate if fn is None else decorate(fn)

    def cron(
        self,
        expression: str,
        /,
        *,
        tz: str = "UTC",
        catch_up: str = "once",
        max_lateness: Duration | None = None,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Run a function at every tick of a cron expression:
        ``@rel.cron("*/5 * * * *", tz="Europe/Berlin")``.

        Each tick makes exactly one job, however many processes and machines run
        workers: every worker (and ``run_until_idle``) enqueues the due ticks, and the
        database keeps one job per schedule and tick. A new schedule starts at its next
        tick. ``tz``: the IANA zone the expression is read in (see ``reliable.cron`` for
        daylight saving time). ``catch_up``: what becomes of ticks missed while no
        worker ran, ``"once"`` (one job, for the newest) or ``"all"`` (one each);
        ``max_lateness``: a tick this much overdue is skipped. Other options are those
        of ``task`` (the schedule is named after the task). The function is called
        with no arguments; its job's ``run_at`` is the tick.

        Raises ``ConfigError`` naming a bad option (``cron``, ``tz``, ``catch_up``,
        ``max_lateness``, or one of ``task``'s), or for a function that needs arguments.
        """

        def decorate(function: Callable[P, R]) -> Task[P, R]:
            task = Task(self.runtime, function, TaskOptions.build(function, **options))
            schedule = Schedule.build(
                task, expression, tz=tz, catch_up=catch_up, max_lateness=max_lateness
            )
            self.register(task)
            self.timetable.add(schedule)
            return task

        return decorate

    def schedules(self) -> list[ScheduleInfo]:
        """The cron schedules of this application, by name, each with its last run (the
        tick, job and status of the newest job it made) and its next run."""
        return self.timetable.infos()

    def purge(self, *, older_than: Duration, status: str | Sequence[str] | None = None) -> int:
        """Remove the jobs that finished more than ``older_than`` ago (seconds,
        ``timedelta`` or ``"7d"``), with their attempts, steps and idempotency keys;
        return how many.

        ``status``: only jobs that ended so (``"failed"``, or several); default every
        finished job. Unfinished jobs are never removed. Works in batches, one
        transaction each, leaving workers time to claim in between. Workers do the same
        by themselves for ``RELIABLE_RESULT_TTL``. Raises ``ConfigError`` naming a bad
        ``older_than`` or ``status``.
        """
        seconds = parse_duration(older_than, name="older_than")
        return purge(self.store, self.clock.now() - seconds, finished_statuses(status))

    @overload
    def offload(self, fn: Callable[P, R], /) -> Callable[P, R]: ...

    @overload
    def offload(self, /, **options: Any) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def offload(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """Offload a route: the request is committed as a job and answered ``202``.

        Place it below the framework's route decorator. Takes the options of ``task``
        (except ``idempotency_key``) and: ``idempotency`` (``"optional"``: honour the
        ``Idempotency-Key`` header when sent; ``"required"``; ``"off"``),
        ``idempotency_scope`` (a function of the request, e.g. the user, that scopes
        keys per caller), ``capture`` (a function of the request returning JSON that
        the handler gets back in the worker; default: the hook set by ``capture``),
        ``session`` (a function of the request returning its SQLAlchemy session or
        connection: the job is written in that transaction, with what the request
        wrote before, and committed before the 202; see docs/transactions.md).
        Needs ``ReliableFlask`` or ``ReliableMiddleware`` on the application.

        Credentials are never stored: not the ``Authorization``, ``Cookie`` and
        ``Proxy-Authorization`` headers nor those in ``RELIABLE_REDACT_HEADERS``, not a
        handler's ``Set-Cookie`` in its stored result, and, for FastAPI, not the values
        of parameters that carry them (``Header()`` on such a header, ``Cookie()``, a
        ``fastapi.security`` scheme); in the worker such a parameter gets the capture
        hook's value under its name, else ``None``. Without ``idempotency_scope``, an
        ``Idempotency-Key`` is scoped to the caller by a digest of the credentials the
        request carries; with it, by its value alone, so that a retry whose session
        cookie or token changed still finds its job.
        """
        if fn is None:
            return lambda function: offload_route(self, function, **options)
        return offload_route(self, fn, **options)

    def status_access(self, fn: StatusAccess) -> StatusAccess:
        """Decide who may read and cancel jobs through the status resource.

        By default a job's status URL is a capability: its id carries 122 random bits,
        and whoever holds the URL (the client that got the 202, and anyone it passes
        the URL to) may read the job (``GET``) and cancel it (``DELETE``); nobody can
        guess one. With a hook, ``fn(request, job, action)`` runs before either, with
        the framework's request, the ``JobInfo`` and ``action`` ``"read"`` or
        ``"cancel"``; a false answer is a ``403``. Use it to require the same
        authentication as the route (``job.task`` names it), or to let only the caller
        whose identity the capture hook stored (``current_job().captured``, not in
        ``JobInfo``) cancel.
        """
        self.runtime.status_hook = fn
        return fn

    def capture(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Set the capture hook of routes that do not pass ``capture=``.

        ``fn(request)`` runs during the request and returns JSON (say, the caller's
        user id); the worker hands it back as ``current_job().captured``. It is how a
        handler learns who called, since credentials are never stored: return who the
        caller is, not the credential itself, which would be stored like any capture.
        A FastAPI parameter withheld for carrying credentials gets, in the worker, the
        value under its name when ``fn`` returns a dict, else ``None``.
        """
        self.runtime.capture_hook = fn
        return fn

    def loop_resource(self, factory: Callable[[], R]) -> LoopResource[R]:
        """An object bound to an event loop, shared by the async jobs of a worker:
        ``factory()`` makes it on first use in each worker's loop, the worker closes it
        (``aclose()``/``close()``) when it stops. Call the result inside an async job to
        get it (see docs/async.md)."""
        return LoopResource(factory)

    # -- jobs ---------------------------------------------------------------------------

    def enqueue_payload(
        self,
        task: Task[Any, Any],
        payload: str,
        *,
        idempotency_key: str | None = None,
        idempotency_scope: str | None = None,
        fingerprint: str | None = None,
        flow: FlowPlan | None = None,
        session: Any = None,
        connection: Any = None,
    ) -> JobHandle[Any]:
        """Commit a job of ``task`` with an already-encoded JSON ``payload``.

        ``idempotency_scope`` defaults to the task; ``fingerprint`` (default: a hash of
        the payload) tells a replay from a conflicting reuse of the key. ``flow`` is the
        job's flow control with its keys resolved. ``session`` or ``connection``: write
        the job in the caller's open SQLAlchemy transaction instead of committing it
        (see ``task.options``). Raises ``RateLimited`` when a rate limit refuses the job
        (nothing is stored), ``ConfigError`` for a transaction on another database.
        """
        call = EnqueueOptions.build(session=session, connection=connection)
        return task.enqueue_payload(
            payload,
            idempotency_key=idempotency_key,
            idempotency_scope=idempotency_scope,
            fingerprint=fingerprint,
            flow=flow,
            call=call,
        )

    def get_job(self, job_id: str) -> JobInfo:
        """A snapshot of the job; raises ``JobNotFound``."""
        return self.runtime.get_job(job_id)

    def flow_state(self) -> dict[str, list[dict[str, Any]]]:
        """Concurrency slots in use and rate-limit windows, per task and key value.

        ``{"concurrency": [{"task", "option", "key", "in_use", "limit"}],
        "rate_limits": [{"task", "option", "key", "limit", "period", "used", "reset"}],
        "throttles": [{"task", "option", "key", "next_start_in"}]}``
        """
        return self.store.flow_state(self.clock.now())

    def send_event(self, name: str, data: Any = None) -> list[str]:
        """Send an event: every job waiting for ``name`` whose ``match`` the ``data``
        meets resumes with it, and every unfinished job whose ``cancel_on`` it is (and
        whose match it meets) is cancelled. Returns the ids of the jobs it woke.

        ``data`` is JSON (SPEC §5 types); raises ``SerializationError`` otherwise.
        """
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigError("name", f"an event name is 1 to 200 characters, got {name!r}")
        woken, cancelled = self.store.send_event(
            uuid.uuid4().hex, name, dumps(data), self.clock.now()
        )
        self.runtime.cancelled(cancelled)
        return woken

    def get_steps(self, job_id: str) -> list[StepInfo]:
        """The job's steps in the order they first ran: name, status, attempts, times,
        result or error (a timeline for the dashboard)."""
        return [StepInfo.from_row(row) for row in self.store.get_steps(job_id)]

    def get_attempts(self, job_id: str) -> list[AttemptInfo]:
        """The attempts of the job that did not succeed, oldest first."""
        return [AttemptInfo.from_row(row) for row in self.store.get_attempts(job_id)]

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle on an existing job."""
        return JobHandle(self.runtime, job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; return false if it had already finished.

        Queued or sleeping, it never runs again. Running, the attempt is told to stop: it
        ends at its next step boundary (``step``, ``sleep``, ``wait_for_event``; the
        step in progress finishes and is kept), its result is discarded and it is not
        retried; its concurrency slots come back only when it has really ended. A
        worker of this process learns of it at once, one elsewhere within
        ``CANCEL_CHECK_SECONDS`` (or at its next step). Raises ``JobNotFound``.
        """
        return self.runtime.cancel(job_id)

    # -- running jobs -------------------------------------------------------------------

    def start_worker(
        self, threads: int | None = None, queues: Sequence[str] | None = None
    ) -> Worker:
        """Start worker threads in this process (``threads`` default
        ``RELIABLE_WORKER_THREADS``; ``queues`` default: every queue of a registered task)."""
        with self._lock:
            if self._worker is not None and self._worker.running:
                raise RuntimeError("a worker is already running for this Reliable")
            worker = Worker(
                self,
                threads=threads or self.settings.worker_threads,
                queues=queues,
                timetable=self.timetable,
            )
            self._worker = self.runtime.worker = worker
        return worker.start()

    def stop_worker(self, timeout: float | None = None, *, exiting: bool = False) -> None:
        """Stop the worker started by ``start_worker``, gracefully (see ``Worker.stop``).

        Attempts still running after ``timeout`` (default ``RELIABLE_SHUTDOWN_GRACE``)
        keep their jobs until they return, unless ``exiting``: the process ends now,
        and their jobs are given back at once for another worker.
        """
        with self._lock:
            worker, self._worker = self._worker, None
            self.runtime.worker = None
        if worker is not None:
            worker.stop(timeout, exiting=exiting)

    @property
    def worker(self) -> Worker | None:
        return self._worker

    def run_until_idle(self, queues: Sequence[str] | None = None) -> int:
        """Run every due job in this thread, one after another; return how many ran.

        For tests: retries scheduled in the future (by the clock) are left for a later
        call, so a test moves its clock and calls again. Cron ticks due by then are
        enqueued first.
        """
        self.timetable.enqueue_due()
        worker_id = self._inline_worker_id
        ran = 0
        while True:
            wanted, tasks = self.claimable(queues, self.runtime.paused(fresh=True))
            claimed = self.store.claim(
                worker_id,
                wanted,
                1,
                self.clock.now(),
                self.settings.lease_seconds,
                tasks=tasks,
                limited=self.limited_at_claim(),
            )
            if not claimed.jobs:
                return ran
            job = claimed.jobs[0]
            control = self.runtime.inline[job.id] = attempt_control(self, job)
            try:
                outcome = run_attempt(self, job, control)
            finally:
                del self.runtime.inline[job.id]
            discarded = self.store.settle(worker_id, [outcome])
            if outcome.status == "failed" and job.id not in discarded:
                after_failure(self, job.id, job.task)
            ran += 1

    def close(self) -> None:
        """Stop the worker and release database connections."""
        self.stop_worker()
        self.runtime.close()
