"""``Reliable``: the registry of tasks, the store, and the workers of one application."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from .clock import Clock, SystemClock
from .context import CANCELLED, AttemptControl
from .errors import (
    ConfigError,
    IdempotencyConflict,
    JobNotFound,
    PayloadTooLarge,
    SerializationError,
)
from .execution import after_failure, attempt_control, run_attempt
from .jobs import AttemptInfo, JobHandle, JobInfo, StepInfo
from .limits import FlowPlan
from .overrides import apply_overrides
from .serialization import dumps
from .settings import Settings
from .store import IdempotencyClaim, NewJob, Store
from .tasks import DEFAULT_QUEUE, Task, TaskOptions
from .worker import Worker, new_worker_id

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("reliable")

# May the caller (a framework request) read or cancel this job? See ``status_access``.
StatusAccess = Callable[[Any, JobInfo, str], bool]

MAX_IDEMPOTENCY_KEY_LENGTH = 255


class Reliable:
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
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        clock: Clock | None = None,
        auto_migrate: bool | None = None,
        **settings: Any,
    ) -> None:
        self.settings = Settings.load(
            {"database_url": database_url, "auto_migrate": auto_migrate, **settings}
        )
        self.clock: Clock = clock or SystemClock()
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._store: Store | None = None
        self._lock = threading.RLock()
        self._worker: Worker | None = None
        self._inline_worker_id = new_worker_id()
        self._inline: dict[str, AttemptControl] = {}  # attempts of run_until_idle
        self.capture_hook: Callable[[Any], Any] | None = None
        self.status_hook: StatusAccess | None = None

    def __repr__(self) -> str:
        return f"<Reliable {self.settings.database_url}>"

    @property
    def store(self) -> Store:
        """The job store, opened (and its schema upgraded) on first use."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = Store(
                        self.settings.database_url,
                        pool_size=self.settings.worker_threads + 4,
                        sqlite_synchronous=self.settings.sqlite_synchronous,
                        auto_migrate=self.settings.auto_migrate,
                    )
        return self._store

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
        ``on_failure`` (called once with the ``JobInfo`` when the job fails for good).

        Raises ``ConfigError`` naming a bad option, or a name already taken.
        """

        def decorate(function: Callable[P, R]) -> Task[P, R]:
            task = Task(self, function, TaskOptions.build(function, **options))
            self.register(task)
            return task

        return decorate if fn is None else decorate(fn)

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
        the handler gets back in the worker; default: the hook set by ``capture``).
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
        from .web.routes import offload

        if fn is None:
            return lambda function: offload(self, function, **options)
        return offload(self, fn, **options)

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
        self.status_hook = fn
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
        self.capture_hook = fn
        return fn

    def register(self, task: Task[Any, Any]) -> None:
        """Add a task to this application; its name must be unused.

        ``RELIABLE_TASK_<NAME>_<OPTION>`` environment variables override the
        decorator's ``concurrency``, ``rate_limit``, ``throttle``, ``priority``,
        ``retries`` and ``timeout``; a bad value raises ``ConfigError`` naming the
        variable.
        """
        task.options = apply_overrides(task.options, os.environ)
        existing = self.tasks.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ConfigError(
                "name",
                f"a task named {task.name!r} is already registered "
                f"({existing.fn.__module__}.{existing.fn.__qualname__}); pass name=...",
            )
        self.tasks[task.name] = task

    def limited_at_claim(self) -> bool:
        """Whether any task here has a concurrency cap or a throttle (checked at claim)."""
        return any(task.options.flow.limited_at_claim for task in self.tasks.values())

    def rate_limited(self) -> bool:
        """Whether any task here has a rate limit (its admissions are pruned by workers)."""
        return any(task.options.flow.rate_limits for task in self.tasks.values())

    def queues(self) -> list[str]:
        """Every queue a registered task uses (and ``default``)."""
        return sorted({DEFAULT_QUEUE, *(task.options.queue for task in self.tasks.values())})

    # -- jobs ---------------------------------------------------------------------------

    def _enqueue_call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        idempotency_key: str | None,
        flow: FlowPlan,
    ) -> JobHandle[Any]:
        try:
            payload = dumps({"args": args, "kwargs": kwargs})
        except SerializationError as exc:
            for name, value in task.argument_names(tuple(args), kwargs).items():
                try:
                    dumps(value)
                except SerializationError as failed:
                    raise SerializationError(
                        f"argument {name!r} of {task.name}: {failed}; nothing was stored"
                    ) from exc
            raise
        limit = self.settings.max_payload
        if len(payload) > limit and len(payload.encode()) > limit:
            raise PayloadTooLarge(
                f"the arguments of {task.name} take {len(payload.encode())} bytes as JSON, "
                f"more than RELIABLE_MAX_PAYLOAD ({limit}); nothing was stored"
            )
        return self.enqueue_payload(task, payload, idempotency_key=idempotency_key, flow=flow)

    def enqueue_payload(
        self,
        task: Task[Any, Any],
        payload: str,
        *,
        idempotency_key: str | None = None,
        idempotency_scope: str | None = None,
        fingerprint: str | None = None,
        flow: FlowPlan | None = None,
    ) -> JobHandle[Any]:
        """Commit a job of ``task`` with an already-encoded JSON ``payload``.

        ``idempotency_scope`` defaults to the task; ``fingerprint`` (default: a hash of
        the payload) tells a replay from a conflicting reuse of the key. ``flow`` is the
        job's flow control with its keys resolved. Raises ``RateLimited`` when a rate
        limit refuses the job (nothing is stored).
        """
        flow = flow or FlowPlan()
        now = self.clock.now()
        job = NewJob(
            id=uuid.uuid4().hex,
            task=task.name,
            queue=task.options.queue,
            priority=task.options.priority,
            payload=payload,
            run_at=now,
            created_at=now,
            idempotency_key=idempotency_key,
            limits=flow.limits,
            rate_limits=flow.rate_limits,
            debounce=flow.debounce,
        )
        claim = None
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not (
                0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH
            ):
                raise ConfigError("idempotency_key", _bad_key(idempotency_key))
            if fingerprint is None:
                fingerprint = hashlib.sha256(payload.encode()).hexdigest()
            claim = IdempotencyClaim(
                scope=idempotency_scope or f"task:{task.name}",
                key=idempotency_key,
                fingerprint=fingerprint,
                expires_at=now + self.settings.idempotency_ttl,
            )
        result = self.store.enqueue(job, claim, now)
        if result.replayed and result.fingerprint != fingerprint:
            raise IdempotencyConflict(idempotency_key or "", result.job_id)
        return JobHandle(
            self,
            result.job_id,
            created=result.created,
            replayed=result.replayed,
            rates=result.rates,
        )

    def get_job(self, job_id: str) -> JobInfo:
        """A snapshot of the job; raises ``JobNotFound``."""
        row = self.store.get_job(job_id)
        if row is None:
            raise JobNotFound(job_id)
        return JobInfo.from_row(row)

    def flow_state(self) -> dict[str, list[dict[str, Any]]]:
        """Concurrency slots in use and rate-limit windows, per task and key value.

        ``{"concurrency": [{"task", "option", "key", "in_use", "limit"}],
        "rate_limits": [{"task", "option", "key", "limit", "period", "used", "reset"}],
        "throttles": [{"task", "option", "key", "next_start_in"}]}``
        """
        return self.store.flow_state(self.clock.now())

    def send_event(self, name: str, data: Any = None) -> list[str]:
        """Send an event: every job waiting for ``name`` whose ``match`` the ``data``
        meets resumes with it. Returns the ids of the jobs it woke.

        ``data`` is JSON (SPEC §5 types); raises ``SerializationError`` otherwise.
        """
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigError("name", f"an event name is 1 to 200 characters, got {name!r}")
        return self.store.send_event(uuid.uuid4().hex, name, dumps(data), self.clock.now())

    def get_steps(self, job_id: str) -> list[StepInfo]:
        """The job's steps in the order they first ran: name, status, attempts, times,
        result or error (a timeline for the dashboard)."""
        return [StepInfo.from_row(row) for row in self.store.get_steps(job_id)]

    def get_attempts(self, job_id: str) -> list[AttemptInfo]:
        """The attempts of the job that did not succeed, oldest first."""
        return [AttemptInfo.from_row(row) for row in self.store.get_attempts(job_id)]

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle on an existing job."""
        return JobHandle(self, job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; return false if it had already finished.

        Queued or sleeping, it never runs again. Running, the attempt is told to stop: it
        ends at its next step boundary (``step``, ``sleep``, ``wait_for_event``; the
        step in progress finishes and is kept), its result is discarded and it is not
        retried; its concurrency slots come back only when it has really ended. A
        worker of this process learns of it at once, one elsewhere within
        ``CANCEL_CHECK_SECONDS`` (or at its next step). Raises ``JobNotFound``.
        """
        if self.store.get_status(job_id) is None:
            raise JobNotFound(job_id)
        cancelled = self.store.cancel(job_id, self.clock.now())
        if cancelled:
            inline = self._inline.get(job_id)
            if inline is not None:
                inline.stop(CANCELLED)
            worker = self._worker
            if worker is not None:
                worker.cancelled([job_id])
        return cancelled

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
            )
            self._worker = worker
        return worker.start()

    def stop_worker(self, timeout: float | None = None, *, exiting: bool = False) -> None:
        """Stop the worker started by ``start_worker``, gracefully (see ``Worker.stop``).

        Attempts still running after ``timeout`` (default ``RELIABLE_SHUTDOWN_GRACE``)
        keep their jobs until they return, unless ``exiting``: the process ends now,
        and their jobs are given back at once for another worker.
        """
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(timeout, exiting=exiting)

    @property
    def worker(self) -> Worker | None:
        return self._worker

    def run_until_idle(self, queues: Sequence[str] | None = None) -> int:
        """Run every due job in this thread, one after another; return how many ran.

        For tests: retries scheduled in the future (by the clock) are left for a later
        call, so a test moves its clock and calls again.
        """
        worker_id = self._inline_worker_id
        ran = 0
        while True:
            claimed = self.store.claim(
                worker_id,
                queues or self.queues(),
                1,
                self.clock.now(),
                self.settings.lease_seconds,
                tasks=list(self.tasks),
                limited=self.limited_at_claim(),
            )
            if not claimed.jobs:
                return ran
            job = claimed.jobs[0]
            control = self._inline[job.id] = attempt_control(self, job)
            try:
                outcome = run_attempt(self, job, control)
            finally:
                del self._inline[job.id]
            discarded = self.store.settle(worker_id, [outcome])
            if outcome.status == "failed" and job.id not in discarded:
                after_failure(self, job.id, job.task)
            ran += 1

    def close(self) -> None:
        """Stop the worker and release database connections."""
        self.stop_worker()
        if self._store is not None:
            self._store.close()
            self._store = None


def _bad_key(key: object) -> str:
    """Why ``key`` is not an idempotency key, without echoing a long one in full."""
    if not isinstance(key, str):
        return f"expected a string of 1 to 255 characters, got {type(key).__name__}"
    shown = repr(key) if len(key) <= 40 else f"{key[:32]!r}... ({len(key)} characters)"
    return f"expected 1 to 255 characters, got {shown}"
