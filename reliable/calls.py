"""The options of one enqueue, apart from the task's arguments.

``send_invoice.options(delay="10m", priority=5).enqueue(42)``: the options are checked
when ``options(...)`` is called and never meet the task's own parameters, so a task
whose function takes ``delay`` or ``priority`` gets them as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from .durations import Duration, parse_duration
from .errors import ConfigError
from .handles import JobHandle

P = ParamSpec("P")
R = TypeVar("R")

MAX_IDEMPOTENCY_KEY_LENGTH = 255


def check_queue(queue: object) -> str:
    """A queue name: 1 to 100 characters, no commas; ``ConfigError`` otherwise."""
    if not isinstance(queue, str) or not queue or len(queue) > 100 or "," in queue:
        raise ConfigError("queue", f"a queue name is 1 to 100 characters, no commas: {queue!r}")
    return queue


def check_priority(priority: object) -> int:
    """A priority: a whole number (higher runs first); ``ConfigError`` otherwise."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigError("priority", f"expected a whole number, got {priority!r}")
    return priority


def check_within(value: Duration | None, name: str) -> float | None:
    """A deadline option (``start_within``, ``finish_within``): a duration > 0, or
    ``None``; ``ConfigError`` naming ``name`` otherwise."""
    if value is None:
        return None
    seconds = parse_duration(value, name=name)
    if seconds <= 0:
        raise ConfigError(name, f"expected a duration > 0, got {value!r}")
    return seconds


def check_idempotency_key(key: object) -> str:
    """An idempotency key: 1 to 255 characters; ``ConfigError`` otherwise (a long key
    is not echoed in full)."""
    if isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return key
    if not isinstance(key, str):
        problem = f"expected a string of 1 to 255 characters, got {type(key).__name__}"
    else:
        shown = repr(key) if len(key) <= 40 else f"{key[:32]!r}... ({len(key)} characters)"
        problem = f"expected 1 to 255 characters, got {shown}"
    raise ConfigError("idempotency_key", problem)


def check_within_transaction(session: object, connection: object) -> object:
    """The caller's transaction to enqueue in: a SQLAlchemy ``Session`` (anything with
    a ``connection()`` method, as ``scoped_session`` and Flask-SQLAlchemy's
    ``db.session``), or a ``Connection``; ``None`` for the store's own. ``ConfigError``
    for both, or for something else (the database it is bound to is checked when the
    job is enqueued)."""
    if session is not None and connection is not None:
        raise ConfigError("session", "give session or connection, not both")
    if session is not None and not callable(getattr(session, "connection", None)):
        raise ConfigError("session", f"expected a SQLAlchemy Session, got {type(session).__name__}")
    if connection is not None and not (
        callable(getattr(connection, "execute", None)) and hasattr(connection, "engine")
    ):
        raise ConfigError(
            "connection", f"expected a SQLAlchemy Connection, got {type(connection).__name__}"
        )
    return session if session is not None else connection


def deadline(due_at: float, *within: float | None) -> float | None:
    """``due_at`` plus the first of ``within`` that is set (the call's, then the task's)."""
    for seconds in within:
        if seconds is not None:
            return due_at + seconds
    return None


@dataclass(frozen=True, slots=True)
class EnqueueOptions:
    """Validated options of one enqueue; ``None`` leaves the task's own.

    ``delay`` (seconds) and ``run_at`` (UTC epoch seconds) say when the job is due;
    ``start_within`` and ``finish_within`` (seconds) count from then. ``within``: the
    caller's SQLAlchemy ``Session`` or ``Connection`` whose transaction the job is
    written in (``None``: a transaction of the store's own, committed at once).
    """

    delay: float | None = None
    run_at: float | None = None
    priority: int | None = None
    queue: str | None = None
    idempotency_key: str | None = None
    start_within: float | None = None
    finish_within: float | None = None
    within: Any = field(default=None, compare=False)

    @classmethod
    def build(
        cls,
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
    ) -> EnqueueOptions:
        """Check every option now; ``ConfigError`` names the bad one (nothing is stored).

        ``delay``: seconds, ``timedelta`` or ``"10m"``, >= 0. ``run_at``: an aware
        ``datetime`` (a naive one is refused: its zone would be a guess); not both.
        ``priority``, ``queue``: as the task options. ``idempotency_key``: 1 to 255
        characters. ``start_within``, ``finish_within``: durations > 0. ``session`` or
        ``connection`` (not both): the caller's transaction to write the job in.
        """
        if delay is not None and run_at is not None:
            raise ConfigError("run_at", "give delay or run_at, not both")
        delay_seconds = None if delay is None else parse_duration(delay, name="delay")
        due = None
        if run_at is not None:
            if not isinstance(run_at, datetime):
                raise ConfigError("run_at", f"expected an aware datetime, got {run_at!r}")
            if run_at.tzinfo is None or run_at.utcoffset() is None:
                raise ConfigError(
                    "run_at",
                    f"{run_at.isoformat()} is a naive datetime: give it a tzinfo "
                    "(datetime(..., tzinfo=timezone.utc))",
                )
            due = run_at.astimezone(timezone.utc).timestamp()
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        return cls(
            delay=delay_seconds,
            run_at=due,
            priority=None if priority is None else check_priority(priority),
            queue=None if queue is None else check_queue(queue),
            idempotency_key=idempotency_key,
            start_within=check_within(start_within, "start_within"),
            finish_within=check_within(finish_within, "finish_within"),
            within=check_within_transaction(session, connection),
        )

    def due_at(self, now: float) -> float:
        """When the job is due, enqueued at ``now``."""
        if self.run_at is not None:
            return self.run_at
        return now + (self.delay or 0.0)


NO_OPTIONS = EnqueueOptions()


class Enqueuer(Protocol[R]):
    """What a ``Call`` enqueues through: a task."""

    def enqueue_with(
        self, options: EnqueueOptions, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> JobHandle[R]: ...

    def enqueue_many_with(
        self,
        options: EnqueueOptions,
        calls: Iterable[tuple[Any, ...] | Mapping[str, Any]],
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[JobHandle[R]]: ...


@dataclass(frozen=True, slots=True)
class Call(Generic[P, R]):
    """A task with the options of one call, made by ``task.options(...)``: immutable,
    and reusable for any number of enqueues."""

    task: Enqueuer[R]
    options: EnqueueOptions

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Commit a job calling the task with these arguments (all of them the task's:
        none is read as an option); return its handle. Raises as ``Task.enqueue``.

        With ``session`` or ``connection``, the job is written in that open transaction
        and nothing is committed: it exists once the caller commits (``handle.pending``
        until then), and never if the caller rolls back."""
        return self.task.enqueue_with(self.options, args, kwargs)

    def enqueue_many(
        self,
        calls: Iterable[tuple[Any, ...] | Mapping[str, Any]],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[JobHandle[R]]:
        """Commit one job per call, all in one transaction, with these options (see
        ``Task.enqueue_many``); return their handles, in order. With ``session`` or
        ``connection``, the batch is written in that open transaction instead."""
        return self.task.enqueue_many_with(self.options, calls, idempotency_keys)
