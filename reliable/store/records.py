"""Plain records passed between the store and the rest of ``reliable``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RateCheck:
    """Admit the job only if fewer than ``limit`` were admitted in ``scope`` in ``period``."""

    scope: str
    limit: int
    period: float


@dataclass(frozen=True, slots=True)
class RateState:
    """A rate-limit scope after an admission decision (for ``RateLimit`` headers).

    ``reset`` is the seconds until a slot of the window frees up.
    """

    scope: str
    limit: int
    period: float
    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class DebounceCheck:
    """Collapse into the pending job of ``scope``; run ``window`` after the last call,
    but no later than ``max_wait`` after the first."""

    scope: str
    window: float
    max_wait: float | None


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to insert; ``payload`` is JSON text.

    ``limits`` is the flow-control document stored with the job (JSON text):
    ``{"concurrency": [[scope, capacity], ...], "throttle": [scope, interval],
    "keys": {...}}``.
    """

    id: str
    task: str
    queue: str
    priority: int
    payload: str
    run_at: float
    created_at: float
    idempotency_key: str | None = None
    limits: str | None = None
    rate_limits: tuple[RateCheck, ...] = ()
    debounce: DebounceCheck | None = None
    cancel_on: str | None = None
    cancel_match: str | None = None
    # Deadlines (UTC epoch seconds): to start by (``start_within``), to finish by
    # (``finish_within``), retries and sleeps included.
    start_by: float | None = None
    finish_by: float | None = None
    # The enqueuing span's trace context (see ``tracing``).
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """Reserve ``key`` within ``scope`` until ``expires_at`` for the job being enqueued."""

    scope: str
    key: str
    fingerprint: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """``created`` is false when an unexpired idempotency key (``replayed``, with the
    ``fingerprint`` it was stored with) or a debounce already named ``job_id``. ``rates``
    are the rate-limit scopes after admitting the job."""

    job_id: str
    created: bool
    fingerprint: str | None = None
    rates: tuple[RateState, ...] = ()
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job leased to a worker for one attempt; ``attempt`` is its fencing token.

    ``slot_group`` names the concurrency scopes the job counts against (none: uncapped).
    A job claimed with ``holds_slots`` took a slot of each; one claimed without them
    (a *rider*) may start only by inheriting the slots of an attempt of the same group
    that this worker holds, when that attempt ends (see ``Outcome.heir``).
    """

    id: str
    task: str
    queue: str
    payload: str
    attempt: int
    started_at: float
    lease_owner: str
    limits: str | None = None
    slot_group: str | None = None
    holds_slots: bool = False
    # Attempts made before the job's last manual retry: not counted against its retries.
    attempt_base: int = 0
    # The job's deadlines (see ``NewJob``); ``start_by`` only until it first ran.
    start_by: float | None = None
    finish_by: float | None = None
    # When the job was due (the queue wait ends at ``started_at``), and the trace
    # context it was enqueued in (see ``tracing``).
    run_at: float | None = None
    trace_context: str | None = None

    def begun(self, at: float) -> ClaimedJob:
        """This claim with its attempt begun at ``at``: a job claimed ahead starts later
        than it was claimed. (``dataclasses.replace`` costs several times more, and this
        is on every attempt's path.)"""
        return ClaimedJob(
            id=self.id,
            task=self.task,
            queue=self.queue,
            payload=self.payload,
            attempt=self.attempt,
            started_at=at,
            lease_owner=self.lease_owner,
            limits=self.limits,
            slot_group=self.slot_group,
            holds_slots=self.holds_slots,
            attempt_base=self.attempt_base,
            start_by=self.start_by,
            finish_by=self.finish_by,
            run_at=self.run_at,
            trace_context=self.trace_context,
        )


@dataclass(slots=True)
class Outcome:
    """The end of one attempt, applied only while the attempt still holds its lease.

    ``status`` is the job's next status: ``succeeded``, ``failed``, ``queued`` (a retry
    at ``run_at``), ``sleeping`` (parked until ``run_at``; the attempt is not counted)
    or ``cancelled``; a job cancelled while the attempt ran stays cancelled whatever the
    outcome. ``counted`` false: the attempt does not count against the retries (it
    never started, or it was given back at shutdown). ``result`` and ``error`` are JSON
    text. Where its slots go (``heir``,
    ``keep_slots``) the worker decides while the outcome waits to be settled: those
    two fields change in place, once per capped job.
    """

    job_id: str
    attempt: int
    status: str
    started_at: float
    finished_at: float
    result: str | None = None
    error: str | None = None
    run_at: float | None = None
    task: str = ""
    counted: bool = True
    # A ``sleeping`` outcome parked on an event wait: due at once if the event came
    # while the attempt was still settling.
    waits: bool = False
    # (job id, attempt) of the rider that took over this attempt's concurrency slots
    # when it ended: settling hands the slots on instead of releasing them.
    heir: tuple[str, int] | None = None
    # No heir yet: keep the slots for a rider of the same group claimed in the same
    # transaction, releasing them only if none is.
    keep_slots: bool = False
    # The job's limits JSON, as claimed: a claim locks the counters of the slots it may
    # give back before it reads any other.
    limits: str | None = None
    # The task's function was called in this attempt of a job with a start deadline:
    # the deadline was met, and is cleared when the outcome is settled.
    began: bool = False


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as stored."""

    id: str
    task: str
    queue: str
    priority: int
    status: str
    payload: str
    result: str | None
    error: str | None
    attempts: int
    run_at: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    idempotency_key: str | None
    limits: str | None
    blocked_on: str | None
    slots_held: int
    attempt_base: int = 0
    replay_of: str | None = None
    cancel_on: str | None = None
    cancel_match: str | None = None
    start_by: float | None = None
    finish_by: float | None = None
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """An attempt that did not succeed."""

    job_id: str
    attempt: int
    worker_id: str | None
    outcome: str
    started_at: float | None
    finished_at: float
    error: str | None


@dataclass(frozen=True, slots=True)
class LostJob:
    """A job whose lease expired: requeued, or failed when its attempts are spent."""

    id: str
    task: str
    status: str


@dataclass(frozen=True, slots=True)
class AttemptStates:
    """What became of attempts a worker holds: those whose job was ``cancelled`` while
    they ran, and those ``lost`` (their lease went to another worker, or expired)."""

    cancelled: frozenset[tuple[str, int]] = frozenset()
    lost: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def of(cls, held: Sequence[tuple[str, int]], rows: Iterable[Any]) -> AttemptStates:
        """From the rows (``id``, ``attempts``, ``status``) still leased of ``held``."""
        leased = {(row.id, row.attempts): row.status for row in rows}
        return cls(
            frozenset(pair for pair, status in leased.items() if status == "cancelled"),
            frozenset(pair for pair in held if pair not in leased),
        )
