"""The job store: a narrow set of atomic operations on SQLite or PostgreSQL.

Every write is one transaction. Uniqueness (job ids, idempotency keys) is held by the
database's indexes, not by checks in Python, so it holds across processes and machines.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    bindparam,
    case,
    func,
    literal_column,
    null,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from ..errors import ConfigError, StoreError
from . import flow, postgres, sqlite, steps
from .lists import among, one_of, per_dialect
from .migrate import ensure_schema
from .reconnect import reconnecting
from .records import (
    AttemptRow,
    AttemptStates,
    ClaimedJob,
    EnqueueResult,
    IdempotencyClaim,
    JobRow,
    NewJob,
    Outcome,
)
from .schema import HOLDS_LEASE, IS_DUE, IS_RUNNING, attempts, idempotency_keys, jobs, workers

TERMINAL = ("succeeded", "failed", "cancelled")
# How an attempt that did not succeed is recorded, by the job's next status.
_ATTEMPT_OUTCOMES = {"queued": "retry", "failed": "failed", "cancelled": "cancelled"}

_LOST_ERROR = {
    "type": "WorkerLost",
    "message": "the worker stopped renewing its lease (it died or lost the database)",
    "traceback": None,
}


def _due(filtered: bool, dialect: str, *, locked: bool = True) -> Select[Any]:
    """Due, unparked jobs of ``:b_queue`` (and ``:tasks``), best first; ``locked``: rows
    another claimer holds are skipped, the others locked.

    One queue, compared with ``=``: the due index then yields the jobs in order, and
    the scan stops at ``:limit``. A list of queues (even of one, as an array on
    PostgreSQL) makes the database read every due job of them and sort."""
    conditions = [
        IS_DUE,
        jobs.c.queue == bindparam("b_queue"),
        jobs.c.run_at <= bindparam("now"),
    ]
    if filtered:
        conditions.append(among(jobs.c.task, "tasks", dialect))
    due = (
        select(jobs.c.id)
        .where(*conditions)
        .order_by(jobs.c.priority.desc(), jobs.c.run_at)
        .limit(bindparam("limit"))
    )
    return due.with_for_update(skip_locked=True) if locked else due


def _start(where: Any, *, holding: str | None = None) -> Any:
    """Lease the jobs ``where`` selects to ``:worker`` for one attempt (``holding``: the
    dialect for which those of ``:holding`` take a slot of each of their scopes)."""
    values: dict[str, Any] = {
        "status": "running",
        "attempts": jobs.c.attempts + 1,
        "lease_owner": bindparam("worker"),
        "lease_expires_at": bindparam("lease_until"),
        "started_at": bindparam("now"),
    }
    if holding is not None:
        held = one_of(jobs.c.id, "holding", holding)
        values.update(slots_held=case((held, 1), else_=0), blocked_on=None)
    return (
        update(jobs)
        .where(where)
        .values(**values)
        .returning(
            jobs.c.id,
            jobs.c.task,
            jobs.c.queue,
            jobs.c.payload,
            jobs.c.attempts,
            jobs.c.priority,
            jobs.c.run_at,
            jobs.c.limits,
        )
    )


# The hot statements, built once: no per-call construction or cache-key work.
_START_DUE = per_dialect(
    lambda d: {f: _start(jobs.c.id.in_(_due(f, d).scalar_subquery())) for f in (False, True)}
)
_CANDIDATES = per_dialect(
    lambda d: {f: flow.candidates_statement(_due(f, d), d) for f in (False, True)}
)
_PARK_WINDOW = per_dialect(
    lambda d: {f: flow.park_window_statement(_due(f, d, locked=False), d) for f in (False, True)}
)
_START_BY_ID = per_dialect(lambda d: _start(one_of(jobs.c.id, "ids", d), holding=d))
# On PostgreSQL, ``_START_BY_ID`` and ``flow.ADJUST`` in one statement (the change of
# the counters as a data-modifying CTE).
_START_AND_ADJUST = _START_BY_ID["postgresql"].add_cte(flow.ADJUST["postgresql"].cte("adjusted"))
_TAKE_OVER = per_dialect(
    lambda d: update(jobs).where(one_of(jobs.c.id, "ids", d)).values(slots_held=1)
)
_HELD = per_dialect(
    lambda d: (
        select(jobs.c.id, jobs.c.attempts, jobs.c.limits, jobs.c.slots_held)
        .where(one_of(jobs.c.id, "ids", d), HOLDS_LEASE, jobs.c.lease_owner == bindparam("worker"))
        .with_for_update()
    )
)
# A job cancelled while its attempt ran stays cancelled whatever the attempt's outcome:
# settling it only gives back the lease and the slots.
_CANCELLED = jobs.c.status == literal_column("'cancelled'")
_SETTLE = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("b_id"),
        jobs.c.attempts == bindparam("b_attempt"),
        jobs.c.lease_owner == bindparam("worker"),
    )
    .values(
        status=case((_CANCELLED, jobs.c.status), else_=bindparam("b_status")),
        attempts=bindparam("b_attempts"),
        result=case((_CANCELLED, null()), else_=bindparam("b_result")),
        error=bindparam("b_error"),
        run_at=bindparam("b_run_at"),
        finished_at=case((_CANCELLED, jobs.c.finished_at), else_=bindparam("b_finished_at")),
        lease_owner=None,
        lease_expires_at=None,
        slots_held=0,
    )
)
_INSERT_JOB = jobs.insert()


class _Held(NamedTuple):
    """A row of ``_HELD``: a job whose attempt the settling worker still leases."""

    id: str
    attempts: int
    limits: str | None
    slots_held: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Jobs leased by a claim, the outcomes it refused because their lease was gone, and
    the heirs of settled attempts that did not inherit their slots (see ``flow.pass_slots``)."""

    jobs: list[ClaimedJob]
    discarded: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    # Claim again at once: slots were released after the claim's choice (jobs they
    # unparked are due now), or due jobs it did not look at were parked.
    again: bool = False


def parse_database_url(raw: str) -> URL:
    """Parse a database URL; ``postgres://`` and ``postgresql://`` mean psycopg 3."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError("RELIABLE_DATABASE_URL", f"not a database URL: {raw!r}") from exc
    backend = url.get_backend_name()
    if backend == "postgres":
        url = url.set(drivername="postgresql+psycopg")
    elif backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            "RELIABLE_DATABASE_URL", f"only sqlite:// and postgresql:// are supported, got {raw!r}"
        )
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(
            "RELIABLE_DATABASE_URL",
            "an in-memory SQLite database cannot be shared by workers; name a file",
        )
    return url


@reconnecting(
    "enqueue",
    "claim",
    "settle",
    "heartbeat",
    "check_attempts",
    "remove_worker",
    "recover_expired",
    "release",
    "cancel",
    "load_steps",
    "record_step",
    "end_wait",
    "get_wait",
    "send_event",
    "wake_orphaned_sleepers",
    "get_job",
    "get_status",
    "get_attempts",
    "has_due",
    "prune_rate_events",
    "sweep_parked",
    "flow_state",
    "count_by_status",
)
class Store:
    """Jobs, attempts, leases and idempotency keys in one database.

    ``url`` is a SQLAlchemy URL (``sqlite:///jobs.db`` or ``postgresql://...``). The
    schema is brought to the current revision on first use when ``auto_migrate`` is set.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        sqlite_synchronous: str = "FULL",
        auto_migrate: bool = True,
    ) -> None:
        self.url = parse_database_url(url)
        self.dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self.engine: Engine
        if self.dialect == "sqlite":
            self.engine = sqlite.make_engine(
                self.url, synchronous=sqlite_synchronous, pool_size=pool_size
            )
            self._insert: Any = sqlite.insert
        else:
            self.engine = postgres.make_engine(self.url, pool_size=pool_size)
            self._insert = postgres.insert
        self._changed = threading.Condition()
        self._rotation = 0
        self._known_scopes: set[str] = set()  # concurrency counter rows that exist
        self._wakers: list[Callable[[], None]] = []
        self.closed = False
        self._users = 0  # workers using this store (see hold)
        self._users_lock = threading.Lock()
        # A store dropped without close() still closes its connections, rather than
        # leaving them to the garbage collector (which warns about each one).
        weakref.finalize(self, self.engine.dispose)
        try:
            ensure_schema(self.engine, auto=auto_migrate)
        except DBAPIError as exc:
            raise StoreError(f"cannot open the database {self.describe()}: {exc}") from exc

    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as connection:
                yield connection
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    @contextmanager
    def _single_statement(self) -> Iterator[Connection]:
        """A connection in autocommit mode, for a write that is one statement: atomic
        on its own, and one round trip (no BEGIN, no COMMIT) instead of three."""
        # SQLite: the driver already runs in autocommit mode; the option only keeps the
        # "begin" hook from opening a transaction. PostgreSQL: psycopg's autocommit.
        options = (
            {"reliable_autocommit": True}
            if self.dialect == "sqlite"
            else {"isolation_level": "AUTOCOMMIT"}
        )
        try:
            with self.engine.connect() as connection:
                yield connection.execution_options(**options)
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                connection = connection.execution_options(reliable_read=True)
                with connection.begin():
                    yield connection
        except DBAPIError as exc:
            raise StoreError(f"database read failed: {exc.orig}") from exc

    # -- local notifications ------------------------------------------------------------

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after this process commits new work (workers in this process)."""
        self._wakers.append(wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        if wake in self._wakers:
            self._wakers.remove(wake)

    def _wake(self) -> None:
        for wake in list(self._wakers):
            wake()

    def _notify_changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for_change(self, timeout: float) -> None:
        """Block until this process settles or cancels a job, or ``timeout`` passes."""
        with self._changed:
            self._changed.wait(timeout)

    def _notify_other_processes(self, connection: Connection) -> None:
        if self.dialect == "postgresql":
            connection.execute(
                text("SELECT pg_notify(:channel, '')"), {"channel": postgres.CHANNEL}
            )

    # -- enqueue ------------------------------------------------------------------------

    def enqueue(
        self, job: NewJob, idempotency: IdempotencyClaim | None, now: float
    ) -> EnqueueResult:
        """Insert ``job``; with ``idempotency``, only if the key is free or expired.

        When an unexpired key already names a job, nothing is written and that job's id
        is returned with ``created=False`` and the fingerprint it was stored with.
        """
        if idempotency is None and not (job.rate_limits or job.debounce):
            with self._single_statement() as connection:
                connection.execute(_INSERT_JOB, self._job_values(job, job.run_at))
            self._wake()
            return EnqueueResult(job.id, True)
        with self._write() as connection:
            if idempotency is not None:
                stmt = self._insert(idempotency_keys).values(
                    scope=idempotency.scope,
                    key=idempotency.key,
                    job_id=job.id,
                    fingerprint=idempotency.fingerprint,
                    expires_at=idempotency.expires_at,
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=[idempotency_keys.c.scope, idempotency_keys.c.key],
                    set_={
                        "job_id": stmt.excluded.job_id,
                        "fingerprint": stmt.excluded.fingerprint,
                        "expires_at": stmt.excluded.expires_at,
                    },
                    where=idempotency_keys.c.expires_at <= now,
                ).returning(idempotency_keys.c.job_id)
                if connection.execute(stmt).first() is None:
                    existing = connection.execute(
                        select(idempotency_keys.c.job_id, idempotency_keys.c.fingerprint).where(
                            idempotency_keys.c.scope == idempotency.scope,
                            idempotency_keys.c.key == idempotency.key,
                        )
                    ).one()
                    return EnqueueResult(
                        existing.job_id, False, existing.fingerprint, replayed=True
                    )
            rates, admitted = flow.admit_rates(connection, self._insert, job, now)
            if admitted > job.created_at:  # it waited behind a later admission
                job = replace(job, created_at=admitted, run_at=max(job.run_at, admitted))
            if job.debounce is not None:
                pending = flow.collapse(connection, self._insert, job, job.debounce, now)
                if pending is not None:
                    if idempotency is not None:  # the key names the job its payload joined
                        connection.execute(
                            update(idempotency_keys)
                            .where(
                                idempotency_keys.c.scope == idempotency.scope,
                                idempotency_keys.c.key == idempotency.key,
                            )
                            .values(job_id=pending)
                        )
                    fingerprint = idempotency.fingerprint if idempotency else None
                    return EnqueueResult(pending, False, fingerprint, rates)
            run_at = job.run_at + (job.debounce.window if job.debounce else 0.0)
            connection.execute(_INSERT_JOB, self._job_values(job, run_at))
        self._wake()
        fingerprint = idempotency.fingerprint if idempotency else None
        return EnqueueResult(job.id, True, fingerprint, rates)

    @staticmethod
    def _job_values(job: NewJob, run_at: float) -> dict[str, Any]:
        return {
            "id": job.id,
            "task": job.task,
            "queue": job.queue,
            "priority": job.priority,
            "status": "queued",
            "payload": job.payload,
            "attempts": 0,
            "run_at": run_at,
            "created_at": job.created_at,
            "idempotency_key": job.idempotency_key,
            "limits": job.limits,
        }

    # -- claim and settle ---------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        queues: Sequence[str],
        limit: int,
        now: float,
        lease_seconds: float,
        finished: Sequence[Outcome] = (),
        tasks: Sequence[str] | None = None,
        limited: bool = True,
        held: Mapping[str, int] | None = None,
        riders: Mapping[str, int] | None = None,
        riders_per_slot: int = 0,
    ) -> ClaimResult:
        """Settle ``finished`` attempts, then lease up to ``limit`` due jobs, in one transaction.

        Due jobs are taken highest priority first, then oldest ``run_at``; with
        ``tasks``, only jobs of those tasks (the ones this worker can run). On
        PostgreSQL rows locked by a concurrent claim are skipped, not waited for.
        ``limited=False`` promises no due job has a concurrency cap or a throttle, so
        the claim is a single statement. ``held``, ``riders`` and ``riders_per_slot``:
        see ``flow.admit_limited``; slots of outcomes marked ``keep_slots`` go to riders
        of their group claimed here, or are released.
        """
        claimed: list[ClaimedJob] = []
        params: dict[str, Any] = {
            "now": now,
            "limit": limit,
            "worker": worker_id,
            "lease_until": now + lease_seconds,
        }
        if tasks is not None:
            params["tasks"] = list(tasks)
        parked = False
        groups: dict[str, str] = {}
        holding: set[str] = set()
        gave_back = False  # slots kept for riders went back: jobs may be unparked
        rows: Sequence[Any] = ()
        with self._write() as connection:
            filtered = tasks is not None
            # The first queue asked rotates, so no queue's backlog starves another.
            self._rotation = (self._rotation + 1) % max(len(queues), 1)
            order = [*queues[self._rotation :], *queues[: self._rotation]]
            if limit > 0 and limited:
                discarded, orphans, rows, decision, parked = self._start_limited(
                    connection,
                    worker_id,
                    finished,
                    filtered,
                    order,
                    params,
                    held=held,
                    riders=riders,
                    riders_per_slot=riders_per_slot,
                )
                groups, holding = decision.groups, set(decision.holding_slots)
                gave_back = bool(decision.gave_back)
            else:
                discarded, orphans, kept = self._settle(connection, worker_id, finished)
                flow.lock_kept(connection, kept)
                if limit > 0:
                    rows = self._due(connection, _START_DUE, filtered, order, params)
                if kept:  # kept for riders, but none was claimed
                    flow.release_slots(connection, kept)
                    gave_back = True
            claimed = [
                ClaimedJob(
                    r.id,
                    r.task,
                    r.queue,
                    r.payload,
                    r.attempts,
                    now,
                    worker_id,
                    r.limits,
                    groups.get(r.id),
                    r.id in holding,
                )
                for r in sorted(rows, key=lambda row: (-row.priority, row.run_at))
            ]
        if finished:
            self._notify_changed()
        return ClaimResult(claimed, discarded, orphans, gave_back or parked)

    def _start_limited(
        self,
        connection: Connection,
        worker_id: str,
        finished: Sequence[Outcome],
        filtered: bool,
        queues: Sequence[str],
        params: dict[str, Any],
        *,
        held: Mapping[str, int] | None,
        riders: Mapping[str, int] | None,
        riders_per_slot: int,
    ) -> tuple[list[str], list[str], Sequence[Any], flow.Admission, bool]:
        """Settle ``finished``, lease the due jobs the limits admit (see
        ``flow.admit_limited``), hand them the slots kept for their groups, park what
        full scopes block. Returns the ids whose lease was gone, the orphans, the rows of
        the jobs started, the decision, and whether jobs it did not look at may have been
        parked or unparked.

        The attempts to settle, the counters of the slots they may give back, the due
        jobs and their counters are all read by one statement (``_CANDIDATES``)."""
        now = params["now"]
        params["held"] = [o.job_id for o in finished] + [o.heir[0] for o in finished if o.heir]
        settled = {o.limits for o in finished}
        may_give_back = flow.kept_scopes(list(settled))
        params["kept"] = may_give_back
        mine: dict[tuple[str, int], Any] = {}  # rows of the attempts to settle
        candidates: list[tuple[str, str | None]] = []
        counters: dict[str, tuple[int, int]] = {}
        flagged: list[str] = []  # kept scopes with jobs parked
        for kind, key, limits, in_use, capacity in self._due(
            connection, _CANDIDATES, filtered, queues, params
        ):
            if kind == flow.HELD:
                mine[(key, in_use)] = _Held(key, in_use, limits, capacity)
            elif kind == flow.CANDIDATE:
                candidates.append((key, limits))
                if in_use is not None:  # SQLite: the counter of its first scope
                    counters[flow.parse(limits).scopes[0]] = (in_use, capacity)
            elif kind == flow.COUNTER:
                counters[key] = (in_use, capacity)
            elif limits:
                flagged += json.loads(limits)
        freed: dict[str, int] = {}
        discarded, orphans, kept = self._settle(connection, worker_id, finished, mine, freed)
        for scope, count in freed.items():  # released since the counters were read
            if scope in counters:
                used, capacity = counters[scope]
                counters[scope] = (used - count, capacity)
        if not settled.issuperset(kept):
            flow.lock_kept(connection, kept)  # an outcome that did not name its limits
        decision = flow.admit_limited(
            connection,
            self.dialect,
            self._insert,
            [(job_id, flow.parse(limits)) for job_id, limits in candidates if limits],
            counters,
            now,
            known=self._known_scopes,
            held=held,
            riders=riders,
            riders_per_slot=riders_per_slot,
        )
        if len(candidates) < params["limit"]:  # the due jobs ran out: riders may be parked
            flow.board_parked(connection, self.dialect, decision, now)
        left = flow.adopt(decision, kept)
        decision.gave_back = left
        # The slots granted here, and those kept for riders that none took.
        change = flow.CounterChange.of(decision.taken, left)
        ids = [job_id for job_id, limits in candidates if not limits]
        ids += decision.granted + decision.riders
        params.update(ids=ids, holding=decision.holding_slots)
        rows: Sequence[Any] = ()
        made = bool(change) and self.dialect == "postgresql"
        if made:
            rows = connection.execute(_START_AND_ADJUST, {**params, **change.params()}).all()
        elif ids:
            rows = connection.execute(_START_BY_ID[self.dialect], params).all()
        parked = flow.park(
            connection,
            decision,
            _PARK_WINDOW[self.dialect][filtered],
            [{**params, "b_queue": name} for name in queues],
        )
        change.apply(connection, flagged, parked=decision.parked_scopes, made=made)
        # Slots the settle released unparked jobs this claim had read past: claim again.
        return discarded, orphans, rows, decision, parked or bool(freed)

    def _due(
        self,
        connection: Connection,
        statements: dict[str, dict[bool, Any]],
        filtered: bool,
        queues: Sequence[str],
        params: dict[str, Any],
    ) -> list[Any]:
        """Run ``statements`` (of ``_due``) for one queue after another, until ``:limit``
        jobs came back (rows of ``_CANDIDATES`` count when their kind is a candidate;
        its ``:kept`` counters are locked by the first)."""
        kinds = statements is _CANDIDATES
        rows: list[Any] = []
        found = 0
        for n, name in enumerate(queues):
            wanted = params["limit"] - found
            if wanted <= 0:
                break
            one = {**params, "b_queue": name, "limit": wanted}
            if kinds and n:
                one["kept"] = one["held"] = []
            got = connection.execute(statements[self.dialect][filtered], one).all()
            rows += got
            found += sum(1 for r in got if r[0] == flow.CANDIDATE) if kinds else len(got)
        return rows

    def settle(self, worker_id: str, finished: Sequence[Outcome]) -> list[str]:
        """Apply the outcomes of finished attempts; return the ids whose lease was gone."""
        with self._write() as connection:
            discarded, _, kept = self._settle(connection, worker_id, finished)
            flow.release_slots(connection, kept)
        self._notify_changed()
        return discarded

    def _settle(
        self,
        connection: Connection,
        worker_id: str,
        finished: Sequence[Outcome],
        held: Mapping[tuple[str, int], Any] | None = None,
        freed: dict[str, int] | None = None,
    ) -> tuple[list[str], list[str], list[str | None]]:
        """Apply ``finished``; return the ids whose lease was gone, the orphans, and the
        limits of slots kept for adoption (still to be released if none adopts them).

        ``held``: the rows of ``_HELD`` for them and their heirs, when already read and
        locked, by (id, attempt); ``freed`` is given the slots released, per scope."""
        if not finished:
            return [], [], []
        # Fencing: an outcome lands only while its attempt still holds the lease. A job
        # cancelled, or taken over after its lease expired, keeps what happened since.
        if held is None:
            ids = [o.job_id for o in finished] + [o.heir[0] for o in finished if o.heir]
            held = {
                (row.id, row.attempts): row
                for row in connection.execute(
                    _HELD[self.dialect], {"ids": ids, "worker": worker_id}
                ).all()
            }
        applied = [o for o in finished if (o.job_id, o.attempt) in held]
        discarded = [o.job_id for o in finished if (o.job_id, o.attempt) not in held]
        if applied:
            connection.execute(
                _SETTLE,
                [
                    {
                        "b_id": o.job_id,
                        "b_attempt": o.attempt,
                        "worker": worker_id,
                        "b_status": o.status,
                        # A sleep is not an attempt: the resumed one keeps its number.
                        "b_attempts": o.attempt if o.counted else o.attempt - 1,
                        "b_result": o.result,
                        "b_error": o.error,
                        "b_run_at": o.run_at if o.run_at is not None else o.finished_at,
                        "b_finished_at": o.finished_at if o.status in TERMINAL else None,
                    }
                    for o in applied
                ],
            )
            failed_attempts = [
                {
                    "job_id": o.job_id,
                    "attempt": o.attempt,
                    "worker_id": worker_id,
                    "outcome": _ATTEMPT_OUTCOMES.get(o.status, "failed"),
                    "started_at": o.started_at,
                    "finished_at": o.finished_at,
                    "error": o.error,
                }
                for o in applied
                if o.error is not None
            ]
            if failed_attempts:
                connection.execute(attempts.insert(), failed_attempts)
            for o in applied:
                if o.waits and not steps.has_waits(connection, o.job_id):
                    # The event arrived while this attempt was settling.
                    connection.execute(
                        update(jobs).where(jobs.c.id == o.job_id).values(run_at=o.finished_at)
                    )
        moves = flow.pass_slots(finished, held)
        if moves.transfers:
            connection.execute(_TAKE_OVER[self.dialect], {"ids": moves.transfers})
        released = flow.slots_of(moves.released)
        flow.release(connection, released)
        if freed is not None:
            freed.update(released)
        return discarded, moves.orphans, moves.kept

    # -- leases -------------------------------------------------------------------------

    def heartbeat(
        self,
        worker_id: str,
        held: Sequence[tuple[str, int]],
        now: Callable[[], float],
        lease_seconds: float,
        *,
        hostname: str,
        pid: int,
        queues: Sequence[str],
        threads: int,
        started_at: float,
    ) -> AttemptStates:
        """Renew the leases ``worker_id`` holds for ``held`` (job id, attempt); record the
        worker alive. Returns which of them were cancelled meanwhile, and which lost
        their lease (their jobs were taken over).

        ``now`` is read once the transaction has its locks: a renewal that waited for
        the database extends the lease from when it is written."""
        with self._write() as connection:
            at = now()
            renewed: Sequence[Any] = ()
            if held:
                renewed = connection.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_([job_id for job_id, _ in held]),
                        jobs.c.lease_owner == worker_id,
                        HOLDS_LEASE,
                    )
                    .values(lease_expires_at=at + lease_seconds)
                    .returning(jobs.c.id, jobs.c.attempts, jobs.c.status)
                ).all()
            stmt = self._insert(workers).values(
                id=worker_id,
                hostname=hostname,
                pid=pid,
                queues=",".join(queues),
                threads=threads,
                started_at=started_at,
                heartbeat_at=at,
            )
            connection.execute(
                stmt.on_conflict_do_update(
                    index_elements=[workers.c.id], set_={"heartbeat_at": stmt.excluded.heartbeat_at}
                )
            )
        return AttemptStates.of(held, renewed)

    def check_attempts(self, worker_id: str, held: Sequence[tuple[str, int]]) -> AttemptStates:
        """Which of the attempts ``held`` (job id, attempt) by ``worker_id`` were
        cancelled, and which lost their lease; a read, cheap enough to run often."""
        if not held:
            return AttemptStates()
        with self._read() as connection:
            rows = connection.execute(
                select(jobs.c.id, jobs.c.attempts, jobs.c.status).where(
                    one_of(jobs.c.id, "ids", self.dialect),
                    jobs.c.lease_owner == bindparam("worker"),
                    HOLDS_LEASE,
                ),
                {"ids": [job_id for job_id, _ in held], "worker": worker_id},
            ).all()
        return AttemptStates.of(held, rows)

    def remove_worker(self, worker_id: str) -> None:
        with self._write() as connection:
            connection.execute(workers.delete().where(workers.c.id == worker_id))

    def recover_expired(self, now: float, limit: int = 500) -> list[str]:
        """Requeue attempts whose lease expired (their worker died); return their job ids.

        The lost attempt counts against the job's retries and is recorded with a
        ``WorkerLost`` error. A cancelled job whose attempt's worker died gets its
        slots back and stays cancelled.
        """
        with self._write() as connection:
            columns = (
                jobs.c.id,
                jobs.c.status,
                jobs.c.attempts,
                jobs.c.lease_owner,
                jobs.c.started_at,
                jobs.c.limits,
                jobs.c.slots_held,
            )
            rows = [
                *connection.execute(
                    select(*columns)
                    .where(IS_RUNNING, jobs.c.lease_expires_at < now)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                ),
                *connection.execute(
                    select(*columns)
                    .where(
                        _CANCELLED,
                        jobs.c.lease_owner.is_not(None),
                        jobs.c.lease_expires_at < now,
                    )
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                ),
            ]
            if not rows:
                return []
            error = json.dumps(_LOST_ERROR)
            lost = [row for row in rows if row.status == "running"]
            if lost:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id == bindparam("b_id"), IS_RUNNING)
                    .values(
                        status="queued",
                        run_at=now,
                        error=error,
                        lease_owner=None,
                        lease_expires_at=None,
                        slots_held=0,
                    ),
                    [{"b_id": row.id} for row in lost],
                )
            ended = [row for row in rows if row.status != "running"]
            if ended:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([row.id for row in ended]))
                    .values(lease_owner=None, lease_expires_at=None, slots_held=0)
                )
            flow.release_slots(connection, [row.limits for row in rows if row.slots_held])
            connection.execute(
                attempts.insert(),
                [
                    {
                        "job_id": row.id,
                        "attempt": row.attempts,
                        "worker_id": row.lease_owner,
                        "outcome": "lost",
                        "started_at": row.started_at,
                        "finished_at": now,
                        "error": error,
                    }
                    for row in rows
                ],
            )
            self._notify_other_processes(connection)
        self._wake()
        return [row.id for row in lost]

    def release(self, worker_id: str, held: Sequence[tuple[str, int]], now: float) -> int:
        """Give back attempts that never ran to completion (graceful shutdown).

        The attempt is not counted: the job is queued again, due at once, for any worker
        (a job cancelled meanwhile stays cancelled, and only its slots come back).
        """
        if not held:
            return 0
        with self._write() as connection:
            attempts_of = dict(held)
            rows = [
                row
                for row in connection.execute(
                    select(
                        jobs.c.id, jobs.c.status, jobs.c.attempts, jobs.c.limits, jobs.c.slots_held
                    )
                    .where(jobs.c.id.in_(attempts_of), jobs.c.lease_owner == worker_id, HOLDS_LEASE)
                    .with_for_update()
                )
                if attempts_of[row.id] == row.attempts
            ]
            if rows:
                connection.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([row.id for row in rows]))
                    .values(
                        status=case((_CANCELLED, jobs.c.status), else_="queued"),
                        attempts=jobs.c.attempts - 1,
                        run_at=now,
                        lease_owner=None,
                        lease_expires_at=None,
                        slots_held=0,
                    )
                )
                flow.release_slots(connection, [row.limits for row in rows if row.slots_held])
            released = sum(1 for row in rows if row.status == "running")
            self._notify_other_processes(connection)
        self._wake()
        return int(released)

    # -- operator actions -----------------------------------------------------------------

    def cancel(self, job_id: str, now: float) -> bool:
        """Cancel a job that has not finished; return false if it had.

        A queued or sleeping job never runs. A running attempt keeps its lease and its
        concurrency slots until it has really ended (its worker learns of the cancel and
        stops it at its next step boundary); its outcome is then discarded.
        """
        with self._write() as connection:
            row = connection.execute(
                select(jobs.c.status).where(jobs.c.id == job_id).with_for_update()
            ).first()
            if row is None or row.status in TERMINAL:
                return False
            connection.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(status="cancelled", finished_at=now, blocked_on=None)
            )
            if row.status == "sleeping":
                steps.remove_waits(connection, job_id)
        self._notify_changed()
        return True

    # -- steps and events ---------------------------------------------------------------

    def load_steps(self, job_id: str) -> dict[str, steps.StepRow]:
        with self._read() as connection:
            return steps.load(connection, job_id)

    def record_step(
        self, attempt: int, worker_id: str, row: steps.StepRow, wait: steps.WaitRow | None = None
    ) -> str | None:
        """Save a step (and, for an event wait, the wait) while the attempt holds its
        lease. Returns the job's status then: ``running``; ``cancelled`` (the step was
        saved, but not a wait: the attempt is to stop); ``None`` when the attempt lost
        its lease, and nothing was written."""
        if wait is None:  # the common case: one statement, one round trip
            with self._single_statement() as connection:
                if steps.save_fenced(connection, self._insert, row, attempt, worker_id):
                    return "running"
        with self._write() as connection:
            state = steps.lease_state(connection, row.job_id, attempt, worker_id)
            if state is None or (state == "cancelled" and wait is not None):
                return state
            steps.save(connection, self._insert, row)
            if wait is not None:
                steps.add_wait(connection, self._insert, wait)
        return state

    def end_wait(
        self, job_id: str, attempt: int, worker_id: str, step: str, result: str | None, now: float
    ) -> str | None:
        """Complete a sleep, or an event wait that timed out, while holding the lease;
        returns the job's status as ``record_step`` does."""
        with self._write() as connection:
            state = steps.lease_state(connection, job_id, attempt, worker_id)
            if state is not None:
                steps.complete_wait(connection, job_id, step, result, now)
        return state

    def get_wait(self, job_id: str, step: str) -> steps.WaitRow | None:
        with self._read() as connection:
            return steps.get_wait(connection, job_id, step)

    def send_event(self, event_id: str, name: str, data: str, now: float) -> list[str]:
        """Store an event and wake every job waiting for it whose match it meets."""
        with self._write() as connection:
            woken = steps.deliver(connection, self._insert, event_id, name, data, now)
            if woken:
                self._notify_other_processes(connection)
        if woken:
            self._wake()
        return woken

    def wake_orphaned_sleepers(self, now: float) -> int:
        """Repair lost wake-ups: sleeping jobs that wait for nothing are due now."""
        with self._write() as connection:
            woken = steps.wake_orphaned_sleepers(connection, now)
            if woken:
                self._notify_other_processes(connection)
        if woken:
            self._wake()
        return woken

    def get_steps(self, job_id: str) -> list[steps.StepRow]:
        rows = self.load_steps(job_id)
        return sorted(rows.values(), key=lambda row: (row.position, row.started_at))

    # -- reads --------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRow | None:
        with self._read() as connection:
            row = connection.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else JobRow(**row._asdict())

    def get_status(self, job_id: str) -> str | None:
        with self._read() as connection:
            status: str | None = connection.execute(
                select(jobs.c.status).where(jobs.c.id == job_id)
            ).scalar()
        return status

    def get_attempts(self, job_id: str) -> list[AttemptRow]:
        with self._read() as connection:
            rows = connection.execute(
                select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.attempt)
            ).all()
        return [AttemptRow(**row._asdict()) for row in rows]

    def has_due(self, queues: Sequence[str], now: float) -> bool:
        """Whether any job of ``queues`` is due; a cheap read before taking the write lock."""
        with self._read() as connection:
            found = connection.execute(
                select(jobs.c.id)
                .where(
                    IS_DUE,
                    jobs.c.queue.in_(queues),
                    jobs.c.run_at <= now,
                )
                .limit(1)
            ).first()
        return found is not None

    def prune_rate_events(self, now: float) -> int:
        """Delete rate-limit admissions that no window counts any more; see ``flow``."""
        with self._write() as connection:
            return flow.prune_rate_events(connection, now)

    def sweep_parked(self) -> int:
        """Unpark jobs of concurrency scopes that have free slots; see ``flow``."""
        with self._write() as connection:
            return flow.sweep_parked(connection)

    def flow_state(self, now: float) -> dict[str, list[dict[str, Any]]]:
        with self._read() as connection:
            return flow.state(connection, now)

    def count_by_status(self) -> dict[str, int]:
        with self._read() as connection:
            rows = connection.execute(
                select(jobs.c.status, func.count()).group_by(jobs.c.status)
            ).all()
        return {row[0]: int(row[1]) for row in rows}

    def live_workers(self, now: float, within: float) -> int:
        """How many workers have renewed their heartbeat in the last ``within`` seconds
        before ``now``: the workers alive anywhere, as far as the database knows."""
        with self._read() as connection:
            count = connection.execute(
                select(func.count())
                .select_from(workers)
                .where(workers.c.heartbeat_at >= now - within)
            ).scalar_one()
        return int(count)

    def hold(self) -> None:
        """A worker starts using this store: ``close`` leaves the connections to it."""
        with self._users_lock:
            self._users += 1

    def let_go(self) -> None:
        """A worker is done with this store; the last one closes it if ``close`` ran."""
        with self._users_lock:
            self._users -= 1
            last = self._users == 0 and self.closed
        if last:
            self.engine.dispose()

    def close(self) -> None:
        """Close the pooled connections, now, or when the last worker still finishing
        its attempts is done with them."""
        with self._users_lock:
            self.closed = True
            busy = self._users > 0
        if not busy:
            self.engine.dispose()
