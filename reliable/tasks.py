"""Tasks: functions marked with ``@rel.task`` and the options that govern their jobs."""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, ParamSpec, TypeVar

import tenacity

from . import tracing
from .calls import (
    NO_OPTIONS,
    Call,
    EnqueueOptions,
    check_priority,
    check_queue,
    check_within,
    deadline,
)
from .durations import Duration, parse_duration
from .errors import (
    ConfigError,
    IdempotencyConflict,
    PayloadTooLarge,
    RateLimited,
    SerializationError,
)
from .handles import JobHandle
from .jobs import JobInfo
from .limits import CancelOn, FlowOptions, FlowPlan, plan, resolve_call_key
from .runtime import Runtime
from .serialization import dumps, register_annotations
from .store import IdempotencyClaim, NewJob

P = ParamSpec("P")
R = TypeVar("R")

Wait = Callable[[tenacity.RetryCallState], float]
IdempotencyKeyFunction = Callable[..., str]
FailureHook = Callable[["JobInfo"], object]

DEFAULT_QUEUE = "default"
MAX_IDEMPOTENCY_KEY_LENGTH = 255
FLOW_OPTIONS = frozenset({"concurrency", "rate_limit", "throttle", "debounce", "key", "max_wait"})


# A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` but a third of
# its cost: the version and variant bits set on 128 random bits.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_job_id() -> str:
    """A new job id: a random UUID (version 4) as 32 lowercase hex digits."""
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


def default_backoff() -> Wait:
    """Exponential backoff with jitter: 1 s initial, doubling, capped at 5 minutes."""
    return tenacity.wait_exponential_jitter(initial=1, max=300)


@dataclass(frozen=True)
class TaskOptions:
    """Validated options of one task. ``retries`` and ``timeout`` fall back to settings."""

    name: str
    retries: int | None
    backoff: Wait
    retry_on: tuple[type[BaseException], ...]
    timeout: float | None
    queue: str
    priority: int
    idempotency_key: IdempotencyKeyFunction | None
    on_failure: FailureHook | None
    flow: FlowOptions = field(default_factory=FlowOptions)
    aliases: tuple[str, ...] = ()
    cancel_on: CancelOn | None = None
    start_within: float | None = None
    finish_within: float | None = None
    # The task these options belong to (set by ``Task``): called, they make a ``Call``
    # of it (``send_invoice.options(delay="10m")``), the name the public API gives.
    task: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        retries: int | None = None,
        backoff: Wait | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        timeout: Duration | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        idempotency_key: IdempotencyKeyFunction | None = None,
        on_failure: FailureHook | None = None,
        aliases: Sequence[str] = (),
        cancel_on: str | CancelOn | None = None,
        start_within: Duration | None = None,
        finish_within: Duration | None = None,
        route: bool = False,
        **flow: Any,
    ) -> TaskOptions:
        """Check every option now, so a bad one fails at import, not at the first job.

        ``flow`` holds ``concurrency``, ``rate_limit``, ``throttle``, ``debounce``,
        ``key`` and ``max_wait`` (see ``reliable.limits``). ``aliases``: former names of
        the task, whose queued jobs it runs (for renames). ``cancel_on``: an event name,
        or ``CancelOn(event, match={...})``, that cancels the job when sent.
        ``start_within``, ``finish_within``: deadlines of each job, counted from when it
        is due (durations > 0; see ``TaskOptions.__call__``).
        """
        unknown = set(flow) - FLOW_OPTIONS
        if unknown:
            raise TypeError(f"unknown task option {sorted(unknown)[0]!r}")
        name = fn.__name__ if name is None else name
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigError("name", f"a task name is 1 to 200 characters, got {name!r}")
        if retries is not None and (not isinstance(retries, int) or retries < 0):
            raise ConfigError("retries", f"expected a whole number >= 0, got {retries!r}")
        if backoff is not None and not callable(backoff):
            raise ConfigError("backoff", f"expected a tenacity wait strategy, got {backoff!r}")
        retry_types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        for kind in retry_types:
            if not (isinstance(kind, type) and issubclass(kind, BaseException)):
                raise ConfigError("retry_on", f"expected exception types, got {kind!r}")
        timeout_seconds = None if timeout is None else parse_duration(timeout, name="timeout")
        if timeout_seconds == 0:
            raise ConfigError("timeout", "must be > 0 (leave it unset for no timeout)")
        check_queue(queue)
        check_priority(priority)
        if idempotency_key is not None and not callable(idempotency_key):
            raise ConfigError("idempotency_key", "expected a function of the task's arguments")
        if on_failure is not None and not callable(on_failure):
            raise ConfigError("on_failure", "expected a function taking the failed JobInfo")
        if isinstance(aliases, str) or not all(
            isinstance(alias, str) and 0 < len(alias) <= 200 and alias != name for alias in aliases
        ):
            raise ConfigError("aliases", f"expected other names of the task, got {aliases!r}")
        cancel = CancelOn.build(cancel_on, fn, route=route)
        return cls(
            name=name,
            retries=retries,
            backoff=backoff or default_backoff(),
            retry_on=retry_types,
            timeout=timeout_seconds,
            queue=queue,
            priority=priority,
            idempotency_key=idempotency_key,
            on_failure=on_failure,
            flow=FlowOptions.build(fn, route=route, **flow),
            aliases=tuple(aliases),
            cancel_on=cancel,
            start_within=check_within(start_within, "start_within"),
            finish_within=check_within(finish_within, "finish_within"),
        )

    def __call__(
        self,
        *,
        delay: Duration | None = None,
        run_at: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        idempotency_key: str | None = None,
        start_within: Duration | None = None,
        finish_within: Duration | None = None,
        session: Any = None,
        connection: Any = None,
    ) -> Call[..., Any]:
        """The options of one enqueue of this task, apart from its arguments:
        ``send_invoice.options(delay="10m", priority=5).enqueue(42)``.

        ``delay`` (seconds, ``timedelta`` or ``"10m"``, >= 0) or ``run_at`` (an aware
        ``datetime``): when the job is due (default: now). ``priority``, ``queue``,
        ``idempotency_key``: instead of the task's. ``start_within``: the job fails,
        without running, if it has not started this long after it is due;
        ``finish_within``: it fails if it has not finished by then, retries and sleeps
        included (both instead of the task's). ``session`` (a SQLAlchemy ``Session``,
        ``scoped_session`` or Flask-SQLAlchemy's ``db.session``) or ``connection`` (a
        ``Connection``): write the job, with its idempotency key, rate-limit admissions
        and debounce state, in that open transaction instead of committing it; see
        docs/transactions.md. Raises ``ConfigError`` naming a bad option now, before
        anything is stored.
        """
        if self.task is None:
            raise TypeError(f"the options of {self.name} belong to no task")
        options = EnqueueOptions.build(
            delay=delay,
            run_at=run_at,
            priority=priority,
            queue=queue,
            idempotency_key=idempotency_key,
            start_within=start_within,
            finish_within=finish_within,
            session=session,
            connection=connection,
        )
        return Call(self.task, options)


class Task(Generic[P, R]):
    """A function whose calls can be enqueued as durable jobs.

    Calling the task runs the function inline, as if undecorated. ``enqueue`` commits a
    job and returns its ``JobHandle``. The dataclasses and pydantic models named in the
    function's type hints are registered, so that any process declaring the task can
    decode them.
    """

    def __init__(self, runtime: Runtime, fn: Callable[P, R], options: TaskOptions) -> None:
        register_annotations(fn)
        self.runtime = runtime
        self.fn = fn
        self.options = options
        self.name = options.name
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__wrapped__ = fn
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # a callable without one: arguments go unchecked
            self.signature = None
        self._fitting: set[tuple[int, tuple[str, ...]]] = set()  # shapes that bind

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def options(self) -> TaskOptions:
        """The task's validated options (``task.options.retries``); called, the options
        of one enqueue: ``task.options(delay="10m").enqueue(...)`` (see
        ``TaskOptions.__call__``)."""
        return self._options

    @options.setter
    def options(self, options: TaskOptions) -> None:
        if options.task is not self:
            options = replace(options)
            object.__setattr__(options, "task", self)
        self._options = options

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def enqueue(
        self, *args: Any, idempotency_key: str | None = None, **kwargs: Any
    ) -> JobHandle[R]:
        """Commit a job that calls the function with these arguments; return its handle.

        The job is durable when this returns. With ``idempotency_key`` (or the task's
        ``idempotency_key`` function), a second enqueue within ``RELIABLE_IDEMPOTENCY_TTL``
        returns the first job instead of creating one.

        Raises ``TypeError`` when the arguments do not fit the function's signature,
        ``SerializationError`` naming the argument that cannot be stored as JSON,
        ``PayloadTooLarge`` past ``RELIABLE_MAX_PAYLOAD``, and ``IdempotencyConflict``
        when the key was used with other arguments. Nothing is stored in any case.
        For a delay, a priority, a queue or deadlines of this call, use
        ``task.options(...).enqueue(...)``.
        """
        options = (
            NO_OPTIONS
            if idempotency_key is None
            else EnqueueOptions(idempotency_key=idempotency_key)
        )
        return self.enqueue_with(options, args, kwargs)

    def enqueue_with(
        self,
        options: EnqueueOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        idempotency_scope: str | None = None,
    ) -> JobHandle[R]:
        """``enqueue`` with the options of this call (see ``TaskOptions.__call__``);
        ``idempotency_scope`` defaults to the task. Raises as ``enqueue``."""
        self.check_call(args, kwargs)
        idempotency_key = options.idempotency_key
        if idempotency_key is None and self.options.idempotency_key is not None:
            idempotency_key = str(self.options.idempotency_key(*args, **kwargs))
        flow = self.plan_flow(args, kwargs)
        payload = self.encode(args, kwargs)
        return self.enqueue_payload(
            payload,
            idempotency_key=idempotency_key,
            idempotency_scope=idempotency_scope,
            flow=flow,
            call=options,
        )

    def plan_flow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FlowPlan:
        """The flow control of one call, its keys resolved from the arguments."""
        return plan(
            self.name,
            self.options.flow,
            lambda key, option: resolve_call_key(key, option, self.fn, args, kwargs),
            self.options.cancel_on,
        )

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The call as the job's JSON payload; raises ``SerializationError`` naming the
        argument that cannot be stored, ``PayloadTooLarge`` past the limit."""
        try:
            payload = dumps({"args": list(args), "kwargs": kwargs})
        except SerializationError as exc:
            for name, value in self.argument_names(args, kwargs).items():
                try:
                    dumps(value)
                except SerializationError as failed:
                    raise SerializationError(
                        f"argument {name!r} of {self.name}: {failed}; nothing was stored"
                    ) from exc
            raise
        limit = self.runtime.settings.max_payload
        if len(payload) > limit and len(payload.encode()) > limit:
            raise PayloadTooLarge(
                f"the arguments of {self.name} take {len(payload.encode())} bytes as JSON, "
                f"more than RELIABLE_MAX_PAYLOAD ({limit}); nothing was stored"
            )
        return payload

    def enqueue_payload(
        self,
        payload: str,
        *,
        idempotency_key: str | None = None,
        idempotency_scope: str | None = None,
        fingerprint: str | None = None,
        flow: FlowPlan | None = None,
        call: EnqueueOptions | None = None,
    ) -> JobHandle[R]:
        """Commit a job of this task with an already-encoded JSON ``payload``.

        ``idempotency_scope`` defaults to the task; ``fingerprint`` (default: a hash of
        the payload) tells a replay from a conflicting reuse of the key. ``flow`` is the
        job's flow control with its keys resolved; ``call`` the options of this call
        (when it is due, its priority, queue and deadlines, the caller's transaction).
        Raises ``RateLimited`` when a rate limit refuses the job, ``IdempotencyConflict``
        for a key used with another payload, ``ConfigError`` for a malformed key or a
        transaction on another database than the store's (nothing is stored).
        """
        call = call or NO_OPTIONS
        runtime = self.runtime
        now = runtime.clock.now()
        job, claim = self.new_job(
            payload, now, call, flow, idempotency_key, idempotency_scope, fingerprint
        )
        fingerprint = None if claim is None else claim.fingerprint
        store = runtime.store
        connection = None if call.within is None else store.joined(call.within)
        try:
            with tracing.enqueue_span(self.name, job.id) as trace_context:
                if trace_context is not None:
                    job = replace(job, trace_context=trace_context)
                result = store.enqueue(job, claim, now, connection=connection)
        except RateLimited as exc:
            runtime.counters.refused(getattr(exc.state, "scope", self.name))
            raise
        if result.replayed and result.fingerprint != fingerprint:
            raise IdempotencyConflict(idempotency_key or "", result.job_id)
        return JobHandle(
            runtime,
            result.job_id,
            created=result.created,
            replayed=result.replayed,
            rates=result.rates,
            # A job this call created waits for the caller's commit; one it found (a
            # key's, a debounce's pending job) belongs to an earlier enqueue.
            pending=(
                store.still_open(connection) if connection is not None and result.created else None
            ),
        )

    def new_job(
        self,
        payload: str,
        now: float,
        call: EnqueueOptions,
        flow: FlowPlan | None,
        idempotency_key: str | None,
        idempotency_scope: str | None = None,
        fingerprint: str | None = None,
    ) -> tuple[NewJob, IdempotencyClaim | None]:
        """The row of a new job of this task and the claim on its idempotency key
        (``ConfigError`` for a malformed key); see ``enqueue_payload``."""
        flow = flow or FlowPlan()
        options = self.options
        due = call.due_at(now)
        job = NewJob(
            id=new_job_id(),
            task=self.name,
            queue=call.queue or options.queue,
            priority=options.priority if call.priority is None else call.priority,
            payload=payload,
            run_at=due,
            created_at=now,
            idempotency_key=idempotency_key,
            limits=flow.limits,
            rate_limits=flow.rate_limits,
            debounce=flow.debounce,
            cancel_on=flow.cancel_on,
            cancel_match=flow.cancel_match,
            start_by=deadline(due, call.start_within, options.start_within),
            finish_by=deadline(due, call.finish_within, options.finish_within),
        )
        if idempotency_key is None:
            return job, None
        if not isinstance(idempotency_key, str) or not (
            0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH
        ):
            raise ConfigError("idempotency_key", _bad_key(idempotency_key))
        if fingerprint is None:
            fingerprint = hashlib.sha256(payload.encode()).hexdigest()
        claim = IdempotencyClaim(
            scope=idempotency_scope or f"task:{self.name}",
            key=idempotency_key,
            fingerprint=fingerprint,
            expires_at=now + self.runtime.settings.idempotency_ttl,
        )
        return job, claim

    def enqueue_many(
        self,
        calls: Iterable[tuple[Any, ...] | Mapping[str, Any]],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[JobHandle[R]]:
        """Commit one job per call, all in one transaction; return their handles, in
        order. Each call is a tuple of positional arguments (``(42,)``, not ``42``) or
        a dict of keyword arguments: ``send_invoice.enqueue_many([(1,), (2,)])``.

        ``idempotency_keys``: one key (or ``None``) per call, instead of the task's
        ``idempotency_key`` function; a key already used, or used earlier in the same
        batch, gives the handle of that job (``replayed``) instead of a new one.
        Checked and raised as ``enqueue``, for the whole batch: when one call is
        refused (bad arguments, ``IdempotencyConflict``, ``RateLimited``), nothing of
        the batch is stored. For a delay, a priority, a queue or a caller's
        transaction, use ``task.options(...).enqueue_many(...)``.
        """
        return self.enqueue_many_with(NO_OPTIONS, calls, idempotency_keys)

    def enqueue_many_with(
        self,
        options: EnqueueOptions,
        calls: Iterable[tuple[Any, ...] | Mapping[str, Any]],
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[JobHandle[R]]:
        """``enqueue_many`` with the options of this call (``Call.enqueue_many``)."""
        if options.idempotency_key is not None:
            raise ConfigError(
                "idempotency_key",
                "one key cannot name a batch of jobs: pass idempotency_keys=[...] to "
                "enqueue_many, one per call",
            )
        pairs = [_arguments(self.name, i, call) for i, call in enumerate(calls)]
        if idempotency_keys is not None and (
            isinstance(idempotency_keys, str) or len(idempotency_keys) != len(pairs)
        ):
            raise ConfigError(
                "idempotency_keys", f"expected a list of {len(pairs)} keys (or None), one per call"
            )
        runtime = self.runtime
        now = runtime.clock.now()
        task_key = self.options.idempotency_key
        static = self.options.flow.empty and self.options.cancel_on is None
        batch: list[NewJob] = []
        claims: list[IdempotencyClaim | None] = []
        plain, _ = self.new_job("", now, options, None, None)  # what every job shares
        for i, (args, kwargs) in enumerate(pairs):
            self.check_call(args, kwargs)
            key = None if idempotency_keys is None else idempotency_keys[i]
            if key is None and task_key is not None:
                key = str(task_key(*args, **kwargs))
            payload = self.encode(args, kwargs)
            if static and key is None:  # the common case, without new_job's work per call
                batch.append(
                    NewJob(
                        id=new_job_id(),
                        task=plain.task,
                        queue=plain.queue,
                        priority=plain.priority,
                        payload=payload,
                        run_at=plain.run_at,
                        created_at=now,
                        start_by=plain.start_by,
                        finish_by=plain.finish_by,
                    )
                )
                claims.append(None)
                continue
            flow = None if static else self.plan_flow(args, kwargs)
            job, claim = self.new_job(payload, now, options, flow, key)
            batch.append(job)
            claims.append(claim)
        if not batch:
            return []
        store = runtime.store
        connection = None if options.within is None else store.joined(options.within)
        try:
            with tracing.enqueue_span(self.name, batch[0].id) as trace_context:
                if trace_context is not None:  # the batch's jobs share its span
                    batch = [replace(job, trace_context=trace_context) for job in batch]
                results = store.enqueue_many(batch, claims, now, connection=connection)
        except RateLimited as exc:
            runtime.counters.refused(getattr(exc.state, "scope", self.name))
            raise
        pending = store.still_open(connection) if connection is not None else None
        return [
            JobHandle(
                runtime,
                result.job_id,
                created=result.created,
                replayed=result.replayed,
                rates=result.rates,
                pending=pending if result.created else None,
            )
            for result in results
        ]

    def check_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` now for arguments a worker could never call ``fn`` with."""
        if self.signature is None:
            return
        # Whether arguments fit depends on their number and keywords, not their values.
        shape = (len(args), tuple(kwargs))
        if shape in self._fitting:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}; nothing was stored") from None
        if len(self._fitting) < 64:
            self._fitting.add(shape)

    def argument_names(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name (positions where there is none)."""
        if self.signature is not None:
            return dict(self.signature.bind(*args, **kwargs).arguments)
        return {**{f"#{i}": value for i, value in enumerate(args)}, **kwargs}

    def invoke(self, payload: dict[str, Any]) -> Any:
        """Run the function with a stored payload; a coroutine for ``async def`` tasks."""
        return self.fn(*payload.get("args", ()), **payload.get("kwargs", {}))


def _arguments(task: str, index: int, call: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One call of an ``enqueue_many`` batch as (args, kwargs); ``TypeError`` naming it
    for anything but a tuple or a mapping."""
    if type(call) is tuple or isinstance(call, tuple):
        return call, {}
    if isinstance(call, Mapping):
        if not all(isinstance(name, str) for name in call):
            raise TypeError(f"{task}: call #{index} has a keyword that is not a string")
        return (), dict(call)
    raise TypeError(
        f"{task}: call #{index} of enqueue_many is {type(call).__name__}: give each call as "
        f"a tuple of positional arguments ((value,) for one) or a dict of keyword "
        "arguments; nothing was stored"
    )


def _bad_key(key: object) -> str:
    """Why ``key`` is not an idempotency key, without echoing a long one in full."""
    if not isinstance(key, str):
        return f"expected a string of 1 to 255 characters, got {type(key).__name__}"
    shown = repr(key) if len(key) <= 40 else f"{key[:32]!r}... ({len(key)} characters)"
    return f"expected 1 to 255 characters, got {shown}"
