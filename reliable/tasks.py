"""Tasks: functions marked with ``@rel.task`` and the options that govern their jobs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import tenacity

from .durations import Duration, parse_duration
from .errors import ConfigError
from .limits import FlowOptions, plan, resolve_call_key
from .serialization import register_annotations

if TYPE_CHECKING:
    from .app import Reliable
    from .jobs import JobHandle, JobInfo

P = ParamSpec("P")
R = TypeVar("R")

Wait = Callable[[tenacity.RetryCallState], float]
IdempotencyKeyFunction = Callable[..., str]
FailureHook = Callable[["JobInfo"], object]

DEFAULT_QUEUE = "default"
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
        route: bool = False,
        **flow: Any,
    ) -> TaskOptions:
        """Check every option now, so a bad one fails at import, not at the first job.

        ``flow`` holds ``concurrency``, ``rate_limit``, ``throttle``, ``debounce``,
        ``key`` and ``max_wait`` (see ``reliable.limits``).
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
        if not isinstance(queue, str) or not queue or len(queue) > 100 or "," in queue:
            raise ConfigError("queue", f"a queue name is 1 to 100 characters, no commas: {queue!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ConfigError("priority", f"expected a whole number, got {priority!r}")
        if idempotency_key is not None and not callable(idempotency_key):
            raise ConfigError("idempotency_key", "expected a function of the task's arguments")
        if on_failure is not None and not callable(on_failure):
            raise ConfigError("on_failure", "expected a function taking the failed JobInfo")
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
        )


class Task(Generic[P, R]):
    """A function whose calls can be enqueued as durable jobs.

    Calling the task runs the function inline, as if undecorated. ``enqueue`` commits a
    job and returns its ``JobHandle``. The dataclasses and pydantic models named in the
    function's type hints are registered, so that any process declaring the task can
    decode them.
    """

    def __init__(self, app: Reliable, fn: Callable[P, R], options: TaskOptions) -> None:
        register_annotations(fn)
        self.app = app
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
        """
        self.check_call(args, kwargs)
        if idempotency_key is None and self.options.idempotency_key is not None:
            idempotency_key = str(self.options.idempotency_key(*args, **kwargs))
        flow = plan(
            self.name,
            self.options.flow,
            lambda key, option: resolve_call_key(key, option, self.fn, args, kwargs),
        )
        return self.app._enqueue_call(self, list(args), kwargs, idempotency_key, flow)

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
