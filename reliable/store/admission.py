"""Admission at claim time: which due jobs with concurrency caps or a throttle may start
now, which ride on slots the claiming worker holds, and which are parked.

A claim takes a slot of each of the job's scopes (a counter row per scope, locked with
``SKIP LOCKED`` on PostgreSQL so claimers never queue behind each other). A job found
waiting for a full scope is *parked* (``blocked_on``): parked jobs are outside the claim
index, so a saturated key with a long backlog costs other keys nothing. When every job a
claim looked at was blocked, the waiting jobs of the full scopes among the next
``PARK_WINDOW`` due ones are parked with them, in one statement per scope. Throttles:
the scope's row holds the earliest next start; starts are spaced by ``period / limit``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Integer,
    Select,
    Text,
    bindparam,
    cast,
    func,
    literal_column,
    null,
    select,
    true,
    union_all,
    update,
)

from .lists import one_of, per_dialect
from .schema import (
    HOLDS_LEASE,
    IS_CLAIMABLE,
    IS_DUE,
    concurrency,
    jobs,
)
from .schema import throttles as throttle_table
from .scopes import Limits, group_scopes, parse
from .slots import LOCK_KEPT, lock_rows


@dataclass
class Admission:
    """What a claim round decided for jobs that carry limits."""

    granted: list[str] = field(default_factory=list)
    holding_slots: list[str] = field(default_factory=list)
    # Jobs of full slot groups this worker holds: they wait in the worker for a slot
    # one of its attempts hands on (see ``pass_slots``).
    riders: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)  # job id -> slot group
    budget: dict[str, int] = field(default_factory=dict)  # riders each group may still take
    taken: dict[str, int] = field(default_factory=dict)  # slots granted, per scope
    # Scopes found full, and the candidates they blocked: to be parked.
    parked_scopes: list[str] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)
    rescheduled: list[tuple[str, float]] = field(default_factory=list)
    # Limits JSON of the slots kept for riders that no rider took: given back.
    gave_back: list[str | None] = field(default_factory=list)


def board_parked(connection: Connection, dialect: str, decision: Admission, now: float) -> None:
    """Take parked jobs as riders of the groups this worker still has room for.

    A backlog parked on a full scope is released one job per freed slot; the worker
    holding the scope's slots takes the rest of it a batch at a time this way."""
    open_groups = {group: n for group, n in decision.budget.items() if n > 0}
    if not open_groups:
        return
    scopes = sorted({scope for group in open_groups for scope in group_scopes(group)})
    statement = (
        select(jobs.c.id, jobs.c.limits)
        .where(
            jobs.c.blocked_on.is_not(None),
            jobs.c.blocked_on.in_(scopes),
            IS_CLAIMABLE,
            jobs.c.run_at <= now,
        )
        .order_by(jobs.c.priority.desc(), jobs.c.run_at)
        .limit(sum(open_groups.values()))
    )
    for row in lock_rows(connection, dialect, statement, skip_locked=True):
        limits = parse(row.limits) if row.limits else None
        group = limits.group if limits is not None else None
        if limits is None or group is None or limits.throttle or open_groups.get(group, 0) <= 0:
            continue
        open_groups[group] -= 1
        decision.budget[group] -= 1
        decision.riders.append(row.id)
        decision.groups[row.id] = group


def adopt(decision: Admission, kept: Sequence[str | None]) -> list[str | None]:
    """Riders of ``decision`` take over the ``kept`` slots (limits JSON) of their group,
    in claim order, and so start holding them; returns the slots left over."""
    if not decision.riders:
        return list(kept)
    waiting: dict[str | None, list[str | None]] = {}
    for document in kept:
        group = parse(document).group if document else None
        waiting.setdefault(group, []).append(document)
    for job_id in decision.riders:
        left = waiting.get(decision.groups[job_id])
        if left:
            left.pop()
            decision.holding_slots.append(job_id)
    return [document for documents in waiting.values() for document in documents]


# The counters of scopes first seen by a claim, once their rows exist.
_COUNTERS = per_dialect(
    lambda d: (
        select(concurrency.c.scope, concurrency.c.in_use, concurrency.c.capacity)
        .where(one_of(concurrency.c.scope, "scopes", d))
        .with_for_update(skip_locked=True)
    )
)


# The kinds of row ``candidates_statement`` returns.
CANDIDATE, COUNTER, KEPT, HELD = 0, 1, 2, 3


def candidates_statement(due: Select[Any], dialect: str) -> Any:
    """The jobs ``due`` selects (their ids), with their limits, and in the same
    statement the counters of the scopes their caps name.

    Rows have a ``kind``: HELD first, one per job of ``:held`` that ``:worker`` still
    leases (``id``, ``limits``, and its attempt and ``slots_held`` as ``in_use`` and
    ``capacity``: see ``Store._settle``); CANDIDATE (``id``, ``limits``; on SQLite also
    ``in_use`` and ``capacity`` of the first scope of its caps); COUNTER (``id`` is the
    scope; ``in_use``, ``capacity``); and one KEPT row whose ``limits`` is the JSON list
    of the scopes among ``:kept`` (those of the slots the claim may give back) that have
    parked jobs. On PostgreSQL a union's parts run in order, and lock in this order:
    the held jobs, the candidates (skipped while another claimer holds them), the kept
    counters in one order, waited for if need be (see ``lock_kept``), and the
    candidates' counters (skipped too). One round trip instead of four.
    """
    jobs_due = due.add_columns(jobs.c.limits).cte("due")
    none = cast(null(), Integer)
    mine = select(
        literal_column(str(HELD)).label("kind"),
        jobs.c.id,
        jobs.c.limits,
        jobs.c.attempts.label("in_use"),
        jobs.c.slots_held.label("capacity"),
    ).where(
        one_of(jobs.c.id, "held", dialect), HOLDS_LEASE, jobs.c.lease_owner == bindparam("worker")
    )
    if dialect != "postgresql":
        # One writer at a time: nothing to lock. Each candidate comes with the counter
        # of its first scope; admit_limited reads any other.
        first = func.json_extract(jobs_due.c.limits, literal_column("'$.concurrency[0][0]'"))
        flagged: Any = select(concurrency.c.scope).where(
            one_of(concurrency.c.scope, "kept", dialect), concurrency.c.parked == 1
        )
        return union_all(
            mine,
            select(
                literal_column(str(CANDIDATE)),
                jobs_due.c.id,
                jobs_due.c.limits,
                concurrency.c.in_use,
                concurrency.c.capacity,
            ).select_from(jobs_due.outerjoin(concurrency, concurrency.c.scope == first)),
            select(
                literal_column(str(KEPT)),
                null(),
                func.json_group_array(flagged.subquery().c.scope),
                none,
                none,
            ),
        )
    jobs_due = jobs_due.prefix_with("MATERIALIZED")  # locked once, read twice
    document = cast(jobs_due.c.limits, JSON).op("->")(literal_column("'concurrency'"))
    caps = func.json_array_elements(document).table_valued("value").lateral("caps")
    scope = caps.c.value.op("->>")(literal_column("0"))
    named = select(scope).select_from(jobs_due.join(caps, true()))
    counters = select(
        literal_column(str(COUNTER)).label("kind"),
        concurrency.c.scope,
        null().label("limits"),
        concurrency.c.in_use,
        concurrency.c.capacity,
    ).where(concurrency.c.scope.in_(named))
    kept = LOCK_KEPT.add_columns(concurrency.c.parked).subquery()  # all locked
    locked = counters.with_for_update(skip_locked=True).subquery()
    held = mine.with_for_update().subquery()
    return union_all(
        select(*held.c),
        select(
            literal_column(str(CANDIDATE)),
            jobs_due.c.id,
            jobs_due.c.limits,
            none,
            none,
        ),
        select(
            literal_column(str(KEPT)),
            null(),
            cast(func.json_agg(kept.c.scope).filter(kept.c.parked == 1), Text),
            none,
            none,
        ),
        select(*locked.c),
    )


def admit_limited(
    connection: Connection,
    dialect: str,
    insert: Any,
    candidates: Sequence[tuple[str, Limits]],
    counters: Mapping[str, tuple[int, int]],
    now: float,
    *,
    known: set[str] | None = None,
    held: Mapping[str, int] | None = None,
    riders: Mapping[str, int] | None = None,
    riders_per_slot: int = 0,
) -> Admission:
    """Decide which of ``candidates`` (id, limits) may start now, in candidate order.

    ``counters`` maps scopes of their caps to (in use, capacity), as read and locked
    with them (``candidates_statement``). A scope missing there is read here: after its
    row is created if it has none (``known`` caches the scopes whose row exists), and on
    SQLite, which reads only each job's first scope with it; on PostgreSQL a scope whose
    row exists and was not read is held by another claimer, and waits for next round.
    ``held`` maps slot groups to how many slots of each the claiming worker holds;
    ``riders`` maps them to how many more jobs of that group it will take as riders;
    each slot granted here adds ``riders_per_slot`` to its group. A candidate whose
    group is full (or locked by another claimer) rides while its group has room,
    instead of being parked; so does one whose scopes the worker alone fills.
    """
    decision = Admission()
    budget = decision.budget = dict(riders or {})
    mine: dict[str, int] = {}  # slots of each scope the claiming worker holds
    for held_group, count in (held or {}).items():
        for scope in group_scopes(held_group):
            mine[scope] = mine.get(scope, 0) + count
    presumed: set[str] = set()  # riders of groups this worker fills on its own
    spare = dict(budget)
    capacities: dict[str, int] = {}
    intervals: dict[str, float] = {}
    for job_id, limits in candidates:
        group = limits.group
        if group is not None and not limits.throttle and spare.get(group, 0) > 0:
            for scope, capacity in limits.caps:
                if mine.get(scope, 0) < capacity:
                    break
            else:  # the worker alone fills every scope of the group
                spare[group] -= 1
                presumed.add(job_id)
                continue
        for scope, capacity in limits.caps:
            capacities[scope] = capacity
        if limits.throttle:
            scope, interval = limits.throttle
            intervals[scope] = interval

    read = dict(counters)
    unseen = [scope for scope in sorted(capacities) if scope not in read]
    if known is not None:
        known.update(read)
    if unseen:
        missing = [scope for scope in unseen if known is None or scope not in known]
        if missing:
            connection.execute(
                insert(concurrency)
                .values(scope=bindparam("s"), in_use=0, capacity=bindparam("c"))
                .on_conflict_do_nothing(index_elements=[concurrency.c.scope]),
                [{"s": scope, "c": capacities[scope]} for scope in missing],
            )
        look = unseen  # SQLite: the claim read only the first counter of each job
        if dialect == "postgresql":
            look = missing  # the others are held by another claimer (or gone)
            if known is not None:
                known.difference_update(unseen)
        rows = connection.execute(_COUNTERS[dialect], {"scopes": look}) if look else ()
        for row in rows:
            read[row.scope] = (int(row.in_use), int(row.capacity))
            if known is not None:
                known.add(row.scope)
    in_use = {scope: read[scope][0] for scope in capacities if scope in read}
    # A task's cap changed: show the new one.
    stale_capacity = {scope for scope in in_use if read[scope][1] != capacities[scope]}
    next_at: dict[str, float] = {}
    if intervals:
        scopes = sorted(intervals)
        connection.execute(
            insert(throttle_table)
            .values(scope=bindparam("s"), next_at=0.0)
            .on_conflict_do_nothing(index_elements=[throttle_table.c.scope]),
            [{"s": scope} for scope in scopes],
        )
        rows = lock_rows(
            connection,
            dialect,
            select(throttle_table.c.scope, throttle_table.c.next_at).where(
                throttle_table.c.scope.in_(scopes)
            ),
            skip_locked=True,
        )
        next_at = {row.scope: float(row.next_at) for row in rows}
    granted_next = dict(next_at)  # advanced by starts granted; persisted
    turn = dict(next_at)  # the start time handed to the next job that must wait

    taken: dict[str, int] = {}
    full: set[str] = set()
    for job_id, limits in candidates:
        slots = limits.scopes
        group = limits.group
        if group is not None and job_id in presumed:
            budget[group] -= 1
            decision.riders.append(job_id)
            decision.groups[job_id] = group
            continue
        locked = False
        blocked: str | None = None  # the first full scope
        for scope in slots:
            used = in_use.get(scope)
            if used is None:
                locked = True
                break
            if blocked is None and used >= capacities[scope]:
                blocked = scope
        if group is not None and (locked or blocked):
            if budget.get(group, 0) > 0 and not limits.throttle:
                budget[group] -= 1
                decision.riders.append(job_id)
                decision.groups[job_id] = group
                continue
            if locked or blocked is None:
                continue  # another claimer holds the scope this instant: next round
            full.add(blocked)
            decision.blocked.append((job_id, blocked))
            continue
        if limits.throttle:
            scope = limits.throttle[0]
            if scope not in next_at:
                continue
            if granted_next[scope] > now:
                # Not its turn: it waits off the claim path until it could be.
                at = max(turn[scope], granted_next[scope])
                decision.rescheduled.append((job_id, at))
                turn[scope] = at + intervals[scope]
                continue
            granted_next[scope] = max(granted_next[scope], now) + intervals[scope]
            turn[scope] = max(turn[scope], granted_next[scope])
        for scope in slots:
            in_use[scope] += 1
            taken[scope] = taken.get(scope, 0) + 1
        decision.granted.append(job_id)
        if group is not None:
            decision.holding_slots.append(job_id)
            decision.groups[job_id] = group
            if riders_per_slot:
                budget[group] = budget.get(group, 0) + riders_per_slot

    decision.taken = taken  # written by the claim's ``CounterChange``, with its releases
    if stale_capacity:
        connection.execute(
            update(concurrency)
            .where(concurrency.c.scope == bindparam("s"))
            .values(capacity=bindparam("c")),
            [{"s": scope, "c": capacities[scope]} for scope in sorted(stale_capacity)],
        )
    advanced = [{"s": s, "t": t} for s, t in granted_next.items() if t != next_at[s]]
    if advanced:
        connection.execute(
            update(throttle_table)
            .where(throttle_table.c.scope == bindparam("s"))
            .values(next_at=bindparam("t")),
            advanced,
        )
    decision.parked_scopes = sorted(full)  # parked by the caller, once granted jobs run
    if decision.rescheduled:
        connection.execute(
            update(jobs).where(jobs.c.id == bindparam("b_id")).values(run_at=bindparam("b_at")),
            [{"b_id": job_id, "b_at": at} for job_id, at in decision.rescheduled],
        )
    return decision


_PARK_ONE = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_id"), IS_DUE)
    .values(blocked_on=bindparam("b_scope"))
)


# How many due jobs, from the head of the queue, a claim that found nothing it could
# start looks through for more jobs of the full scopes, to park them at once.
PARK_WINDOW = 5000


def park_window_statement(window: Any, dialect: str) -> Any:
    """The ids among ``window`` (a select of due job ids, bound ``:limit``) of the jobs
    that count against the full scope ``:b_needle`` (the scope as JSON: their limits
    name it). On PostgreSQL rows another claimer holds are left to it."""
    find = func.strpos if dialect == "postgresql" else func.instr
    matching = select(jobs.c.id).where(
        jobs.c.id.in_(window.scalar_subquery()),
        find(jobs.c.limits, bindparam("b_needle")) > 0,
    )
    return matching.with_for_update(skip_locked=True) if dialect == "postgresql" else matching


_PARK_SOME = per_dialect(
    lambda d: (
        update(jobs)
        .where(one_of(jobs.c.id, "ids", d), IS_DUE)
        .values(blocked_on=bindparam("b_scope"))
    )
)


_FLAG_PARKED = per_dialect(
    lambda d: update(concurrency).where(one_of(concurrency.c.scope, "scopes", d)).values(parked=1)
)


def park(
    connection: Connection,
    decision: Admission,
    window: Any,
    queues: Sequence[Mapping[str, Any]],
) -> bool:
    """Move jobs of full scopes off the claim path (after the granted ones started);
    return whether jobs the claim did not look at may have been parked.

    The blocked candidates go one by one; when a whole round was blocked (a saturated
    key at the head of the queue), ``window`` (see ``park_window_statement``; one set of
    parameters per queue in ``queues``) finds every job of those scopes near the head of
    each queue, to park them at once.
    """
    whole = bool(decision.parked_scopes) and not decision.granted and not decision.riders
    if whole:
        for scope in decision.parked_scopes:
            ids = [
                job_id
                for params in queues
                for job_id in connection.execute(
                    window, {**params, "limit": PARK_WINDOW, "b_needle": json.dumps(scope)}
                ).scalars()
            ]
            connection.execute(_PARK_SOME[connection.dialect.name], {"ids": ids, "b_scope": scope})
    elif decision.blocked:
        connection.execute(_PARK_ONE, [{"b_id": i, "b_scope": s} for i, s in decision.blocked])
    else:
        return False
    # The scopes' rows are locked by this claim: no release can miss the flag.
    connection.execute(_FLAG_PARKED[connection.dialect.name], {"scopes": decision.parked_scopes})
    return whole
