"""Tasks: functions marked with ``@rel.task`` and the options that govern their jobs."""

from __future__ import annotations

import hashlib
import inspect
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, ParamSpec, TypeVar

import tenacity

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
from .errors import ConfigError, IdempotencyConflict, PayloadTooLarge, SerializationError
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
    ) -> Call[..., Any]:
        """The options of one enqueue of this task, apart from its arguments:
        ``send_invoice.options(delay="10m", priority=5).enqueue(42)``.

        ``delay`` (seconds, ``timedelta`` or ``"10m"``, >= 0) or ``run_at`` (an aware
        ``datetime``): when the job is due (default: now). ``priority``, ``queue``,
        ``idempotency_key``: instead of the task's. ``start_within``: the job fails,
        without running, if it has not started this long after it is due;
        ``finish_within``: it fails if it has not finished by then, retries and sleeps
        included (both instead of the task's). Raises ``ConfigError`` naming a bad
        option now, before anything is stored.
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
        flow = plan(
            self.name,
            self.options.flow,
            lambda key, option: resolve_call_key(key, option, self.fn, args, kwargs),
            self.options.cancel_on,
        )
        payload = self.encode(args, kwargs)
        return self.enqueue_payload(
            payload,
            idempotency_key=idempotency_key,
            idempotency_scope=idempotency_scope,
            flow=flow,
            call=options,
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
        (when it is due, its priority, queue and deadlines). Raises ``RateLimited`` when
        a rate limit refuses the job, ``IdempotencyConflict`` for a key used with
        another payload, ``ConfigError`` for a malformed key (nothing is stored).
        """
        flow = flow or FlowPlan()
        call = call or NO_OPTIONS
        options = self.options
        runtime = self.runtime
        now = runtime.clock.now()
        due = call.due_at(now)
        job = NewJob(
            id=uuid.uuid4().hex,
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
        claim = None
        if idempotency_key is not None:
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
                expires_at=now + runtime.settings.idempotency_ttl,
            )
        result = runtime.store.enqueue(job, claim, now)
        if result.replayed and result.fingerprint != fingerprint:
            raise IdempotencyConflict(idempotency_key or "", result.job_id)
        return JobHandle(
            runtime,
            result.job_id,
            created=result.created,
            replayed=result.replayed,
            rates=result.rates,
        )

    def check_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise ``TypeError`` now for arguments a worker could never call ``fn`` with."""
        if self.signature is None:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}; nothing was stored") from None

    def argument_names(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name (positions where there is none)."""
        if self.signature is not None:
            return dict(self.signature.bind(*args, **kwargs).arguments)
        return {**{f"#{i}": value for i, value in enumerate(args)}, **kwargs}

    def invoke(self, payload: dict[str, Any]) -> Any:
        """Run the function with a stored payload; a coroutine for ``async def`` tasks."""
        return self.fn(*payload.get("args", ()), **payload.get("kwargs", {}))


def _bad_key(key: object) -> str:
    """Why ``key`` is not an idempotency key, without echoing a long one in full."""
    if not isinstance(key, str):
        return f"expected a string of 1 to 255 characters, got {type(key).__name__}"
    shown = repr(key) if len(key) <= 40 else f"{key[:32]!r}... ({len(key)} characters)"
    return f"expected 1 to 255 characters, got {shown}"
