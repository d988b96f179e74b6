"""Claim and settle: due jobs leased to a worker, outcomes of finished attempts applied,
in one transaction per round.

Outcomes are fenced: one lands only while its attempt still holds the job's lease. Jobs
with concurrency caps or a throttle go through ``admission``; their slots through
``slots``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    Connection,
    Double,
    Integer,
    Select,
    String,
    Text,
    bindparam,
    case,
    cast,
    column,
    func,
    literal_column,
    null,
    select,
    update,
)

from . import admission, scopes, slots, steps
from .database import Database
from .lists import among, one_of, per_dialect
from .records import (
    ClaimedJob,
    Outcome,
)
from .schema import (
    HOLDS_LEASE,
    IS_CANCELLED,
    IS_DUE,
    TERMINAL,
    attempts,
    jobs,
)

# How an attempt that did not succeed is recorded, by the job's next status.
_ATTEMPT_OUTCOMES = {"queued": "retry", "failed": "failed", "cancelled": "cancelled"}


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
            jobs.c.attempt_base,
            jobs.c.start_by,
            jobs.c.finish_by,
            jobs.c.trace_context,
        )
    )


# The hot statements, built once: no per-call construction or cache-key work.
_START_DUE = per_dialect(
    lambda d: {f: _start(jobs.c.id.in_(_due(f, d).scalar_subquery())) for f in (False, True)}
)


_CANDIDATES = per_dialect(
    lambda d: {f: admission.candidates_statement(_due(f, d), d) for f in (False, True)}
)


_PARK_WINDOW = per_dialect(
    lambda d: {
        f: admission.park_window_statement(_due(f, d, locked=False), d) for f in (False, True)
    }
)


_START_BY_ID = per_dialect(lambda d: _start(one_of(jobs.c.id, "ids", d), holding=d))


# On PostgreSQL, ``_START_BY_ID`` and ``slots.ADJUST`` in one statement (the change of
# the counters as a data-modifying CTE).
_START_AND_ADJUST = _START_BY_ID["postgresql"].add_cte(slots.ADJUST["postgresql"].cte("adjusted"))


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


_SETTLE = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("b_id"),
        jobs.c.attempts == bindparam("b_attempt"),
        jobs.c.lease_owner == bindparam("worker"),
    )
    .values(
        status=case((IS_CANCELLED, jobs.c.status), else_=bindparam("b_status")),
        attempts=bindparam("b_attempts"),
        result=case((IS_CANCELLED, null()), else_=bindparam("b_result")),
        error=bindparam("b_error"),
        run_at=bindparam("b_run_at"),
        finished_at=case((IS_CANCELLED, jobs.c.finished_at), else_=bindparam("b_finished_at")),
        lease_owner=None,
        lease_expires_at=None,
        slots_held=0,
    )
)


# PostgreSQL: the outcomes of a round as one bound JSON parameter (a list of lists, in
# the order of ``_SETTLED``), joined to the jobs: one statement, where ``_SETTLE`` run
# for each outcome would cost a round trip (or a pipelined statement) each.
_SETTLED = (
    ("id", String),
    ("attempt", Integer),
    ("status", String),
    ("attempts", Integer),
    ("result", Text),
    ("error", Text),
    ("run_at", Double),
    ("finished_at", Double),
)
_OUTCOME_ROWS = (
    func.json_array_elements(cast(bindparam("rows"), JSON))
    .table_valued(column("value", JSON))
    .alias("o")
)
_O: dict[str, Any] = {
    name: cast(_OUTCOME_ROWS.c.value.op("->>")(literal_column(str(i))), type_)
    for i, (name, type_) in enumerate(_SETTLED)
}
_SETTLE_FROM_JSON = (
    update(jobs)
    .where(
        jobs.c.id == _O["id"],
        jobs.c.attempts == _O["attempt"],
        jobs.c.lease_owner == bindparam("worker"),
    )
    .values(
        status=case((IS_CANCELLED, jobs.c.status), else_=_O["status"]),
        attempts=_O["attempts"],
        result=case((IS_CANCELLED, null()), else_=_O["result"]),
        error=_O["error"],
        run_at=_O["run_at"],
        finished_at=case((IS_CANCELLED, jobs.c.finished_at), else_=_O["finished_at"]),
        lease_owner=None,
        lease_expires_at=None,
        slots_held=0,
    )
)


_MET_START = per_dialect(
    lambda d: update(jobs).where(one_of(jobs.c.id, "ids", d)).values(start_by=None)
)


class _Held(NamedTuple):
    """A row of ``_HELD``: a job whose attempt the settling worker still leases."""

    id: str
    attempts: int
    limits: str | None
    slots_held: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """Jobs leased by a claim, the outcomes it refused because their lease was gone, and
    the heirs of settled attempts that did not inherit their slots (see ``slots.pass_slots``)."""

    jobs: list[ClaimedJob]
    discarded: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    # Claim again at once: slots were released after the claim's choice (jobs they
    # unparked are due now), or due jobs it did not look at were parked.
    again: bool = False


class Claiming(Database):
    """Claiming due jobs and settling finished attempts (see ``Store``)."""

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
        see ``admission.admit_limited``; slots of outcomes marked ``keep_slots`` go to riders
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
                slots.lock_kept(connection, kept)
                if limit > 0:
                    rows = self._due(connection, _START_DUE, filtered, order, params)
                if kept:  # kept for riders, but none was claimed
                    slots.release_slots(connection, kept)
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
                    r.attempt_base,
                    r.start_by,
                    r.finish_by,
                    run_at=r.run_at,
                    trace_context=r.trace_context,
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
    ) -> tuple[list[str], list[str], Sequence[Any], admission.Admission, bool]:
        """Settle ``finished``, lease the due jobs the limits admit (see
        ``admission.admit_limited``), hand them the slots kept for their groups, park what
        full scopes block. Returns the ids whose lease was gone, the orphans, the rows of
        the jobs started, the decision, and whether jobs it did not look at may have been
        parked or unparked.

        The attempts to settle, the counters of the slots they may give back, the due
        jobs and their counters are all read by one statement (``_CANDIDATES``)."""
        now = params["now"]
        params["held"] = [o.job_id for o in finished] + [o.heir[0] for o in finished if o.heir]
        settled = {o.limits for o in finished}
        may_give_back = scopes.kept_scopes(list(settled))
        params["kept"] = may_give_back
        mine: dict[tuple[str, int], Any] = {}  # rows of the attempts to settle
        candidates: list[tuple[str, str | None]] = []
        counters: dict[str, tuple[int, int]] = {}
        flagged: list[str] = []  # kept scopes with jobs parked
        for kind, key, limits, in_use, capacity in self._due(
            connection, _CANDIDATES, filtered, queues, params
        ):
            if kind == admission.HELD:
                mine[(key, in_use)] = _Held(key, in_use, limits, capacity)
            elif kind == admission.CANDIDATE:
                candidates.append((key, limits))
                if in_use is not None:  # SQLite: the counter of its first scope
                    counters[scopes.parse(limits).scopes[0]] = (in_use, capacity)
            elif kind == admission.COUNTER:
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
            slots.lock_kept(connection, kept)  # an outcome that did not name its limits
        decision = admission.admit_limited(
            connection,
            self.dialect,
            self._insert,
            [(job_id, scopes.parse(limits)) for job_id, limits in candidates if limits],
            counters,
            now,
            known=self._known_scopes,
            held=held,
            riders=riders,
            riders_per_slot=riders_per_slot,
        )
        if len(candidates) < params["limit"]:  # the due jobs ran out: riders may be parked
            admission.board_parked(connection, self.dialect, decision, now)
        left = admission.adopt(decision, kept)
        decision.gave_back = left
        # The slots granted here, and those kept for riders that none took.
        change = slots.CounterChange.of(decision.taken, left)
        ids = [job_id for job_id, limits in candidates if not limits]
        ids += decision.granted + decision.riders
        params.update(ids=ids, holding=decision.holding_slots)
        rows: Sequence[Any] = ()
        made = bool(change) and self.dialect == "postgresql"
        if made:
            rows = connection.execute(_START_AND_ADJUST, {**params, **change.params()}).all()
        elif ids:
            rows = connection.execute(_START_BY_ID[self.dialect], params).all()
        parked = admission.park(
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
            found += sum(1 for r in got if r[0] == admission.CANDIDATE) if kinds else len(got)
        return rows

    def settle(self, worker_id: str, finished: Sequence[Outcome]) -> list[str]:
        """Apply the outcomes of finished attempts; return the ids whose lease was gone."""
        with self._write() as connection:
            discarded, _, kept = self._settle(connection, worker_id, finished)
            slots.release_slots(connection, kept)
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
            settled = [
                (
                    o.job_id,
                    o.attempt,
                    o.status,
                    # A sleep is not an attempt: the resumed one keeps its number.
                    o.attempt if o.counted else o.attempt - 1,
                    o.result,
                    o.error,
                    o.run_at if o.run_at is not None else o.finished_at,
                    o.finished_at if o.status in TERMINAL else None,
                )
                for o in applied
            ]
            if self.dialect == "postgresql":
                rows = json.dumps(settled, ensure_ascii=False)
                connection.execute(_SETTLE_FROM_JSON, {"rows": rows, "worker": worker_id})
            else:
                names = [f"b_{name}" for name, _ in _SETTLED]
                connection.execute(
                    _SETTLE,
                    [
                        {"worker": worker_id, **dict(zip(names, row, strict=True))}
                        for row in settled
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
            began = [o.job_id for o in applied if o.began]
            if began:  # a start deadline met: retries and resumptions are not held to it
                connection.execute(_MET_START[self.dialect], {"ids": began})
            for o in applied:
                if o.waits and not steps.has_waits(connection, o.job_id):
                    # The event arrived while this attempt was settling.
                    connection.execute(
                        update(jobs).where(jobs.c.id == o.job_id).values(run_at=o.finished_at)
                    )
        moves = slots.pass_slots(finished, held)
        if moves.transfers:
            connection.execute(_TAKE_OVER[self.dialect], {"ids": moves.transfers})
        released = scopes.slots_of(moves.released)
        slots.release(connection, released)
        if freed is not None:
            freed.update(released)
        return discarded, moves.orphans, moves.kept
