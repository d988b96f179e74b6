"""Flow control inside the store's transactions: slots, parking, rate windows, throttles.

Concurrency: a claim takes a slot of each of the job's scopes (a counter row per
scope, locked with ``SKIP LOCKED`` on PostgreSQL so claimers never queue behind each
other). A job found waiting for a full scope is *parked* (``blocked_on``): parked jobs
are outside the claim index, so a saturated key with a long backlog costs other keys
nothing. When every job a claim looked at was blocked, the waiting jobs of the full
scopes among the next ``PARK_WINDOW`` due ones are parked with them, in one statement
per scope. Each released slot unparks the next job of its scope; a periodic sweep
repairs what a race let slip.

Rate limits: a sliding window, exact across processes: the scope's row is locked, the
admissions of the last period counted, and the job admitted only under the limit.

Throttles: the scope's row holds the earliest next start; starts are spaced by
``period / limit``, checked when the job is claimed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Mapping, Sequence
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
    delete,
    func,
    literal_column,
    null,
    select,
    true,
    union_all,
    update,
)

from ..errors import RateLimited
from .lists import JSONList, one_of, per_dialect
from .records import DebounceCheck, NewJob, Outcome, RateState
from .schema import (
    HOLDS_LEASE,
    IS_CLAIMABLE,
    IS_DUE,
    concurrency,
    debounces,
    jobs,
    rate_events,
    rate_limits,
)
from .schema import throttles as throttle_table


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


@dataclass(frozen=True)
class Limits:
    """A job's limits document, parsed: its caps (scope, capacity), its throttle
    (scope, interval), its slot group: the name of the set of scopes it counts against
    (None if uncapped), and the values of its keys (option, value)."""

    caps: tuple[tuple[str, int], ...]
    throttle: tuple[str, float] | None
    group: str | None
    keys: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def scopes(self) -> tuple[str, ...]:
        """The scopes of its caps."""
        return tuple(scope for scope, _ in self.caps)


@functools.lru_cache(maxsize=4096)
def parse(document: str) -> Limits:
    """Parse a limits document (JSON); jobs of one task and key share one, so the
    result is cached."""
    limits = json.loads(document)
    caps = tuple((str(scope), int(capacity)) for scope, capacity in limits.get("concurrency", ()))
    throttle = limits.get("throttle")
    return Limits(
        caps,
        (str(throttle[0]), float(throttle[1])) if throttle else None,
        json.dumps([scope for scope, _ in caps], separators=(",", ":")) if caps else None,
        tuple((str(option), str(value)) for option, value in limits.get("keys", {}).items()),
    )


@functools.lru_cache(maxsize=4096)
def group_scopes(group: str) -> tuple[str, ...]:
    return tuple(json.loads(group))


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
    for row in _lock(connection, dialect, statement, skip_locked=True):
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


_LOCK_IN_ORDER = (
    select(concurrency.c.scope)
    .where(one_of(concurrency.c.scope, "kept", "postgresql"))
    .order_by(concurrency.c.scope)
    .with_for_update()
)


def _lock(connection: Connection, dialect: str, statement: Any, *, skip_locked: bool) -> Any:
    if dialect == "postgresql":
        statement = statement.with_for_update(skip_locked=skip_locked)
    return connection.execute(statement)


def _grouped(changes: dict[str, int]) -> list[dict[str, Any]]:
    """``{scope: n}`` as one parameter set per distinct ``n``: ``{"n": n, "scopes": [...]}``,
    so that a change applies to many scopes in one statement."""
    by_amount: dict[int, list[str]] = {}
    for scope, amount in sorted(changes.items()):
        by_amount.setdefault(amount, []).append(scope)
    return [{"n": amount, "scopes": scopes} for amount, scopes in sorted(by_amount.items())]


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
    kept = _LOCK_IN_ORDER.add_columns(concurrency.c.parked).subquery()  # all locked
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
        rows = _lock(
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


def _unpark_statement(dialect: str) -> Any:
    """Unpark the next ``:b_count`` jobs of ``:b_scope``. On PostgreSQL rows another
    transaction holds are passed over, not waited for: a claim holds its candidates
    while it waits for the counters it keeps (see ``lock_kept``), so a release that
    waited here, holding counters, could wait for it in turn."""
    parked = (
        select(jobs.c.id)
        .where(jobs.c.blocked_on == bindparam("b_scope"))
        .order_by(jobs.c.priority.desc(), jobs.c.run_at)
        .limit(bindparam("b_count"))
    )
    if dialect == "postgresql":
        parked = parked.with_for_update(skip_locked=True)
    return update(jobs).where(jobs.c.id.in_(parked.scalar_subquery())).values(blocked_on=None)


_UNPARK = per_dialect(_unpark_statement)


def _change_counters(dialect: str, where: Any, in_use: Any) -> Any:
    """Set the counters ``where`` selects to ``in_use`` (never below 0); returns each
    scope's parked flag. On PostgreSQL the rows are locked in one order first, so that
    transactions changing overlapping scopes cannot deadlock (SQLite has one writer)."""
    statement = update(concurrency)
    if dialect == "postgresql":
        locked = (
            select(concurrency.c.scope)
            .where(where)
            .order_by(concurrency.c.scope)
            .with_for_update()
            .cte("locked")
            .prefix_with("MATERIALIZED")
        )
        statement = statement.where(concurrency.c.scope == locked.c.scope)
    else:
        statement = statement.where(where)
    floor = func.greatest if dialect == "postgresql" else func.max
    return statement.values(in_use=floor(in_use, 0)).returning(
        concurrency.c.scope, concurrency.c.parked
    )


# Give back ``:n`` slots of each of ``:scopes``.
_RELEASE = per_dialect(
    lambda d: _change_counters(
        d, one_of(concurrency.c.scope, "scopes", d), concurrency.c.in_use - bindparam("n")
    )
)


def _adjust_statement(dialect: str) -> Any:
    """Add to each counter of ``:changes`` (a list of [scope, amount], bound as JSON)
    its amount, never going below 0. A claim locked these counters already."""
    listed = bindparam("changes", type_=JSONList())
    if dialect == "postgresql":
        pairs = func.json_array_elements(cast(listed, JSON)).table_valued("value").alias("c")
        scope: Any = pairs.c.value.op("->>")(literal_column("0"))
        amount: Any = cast(pairs.c.value.op("->>")(literal_column("1")), Integer)
        floor: Any = func.greatest
    else:
        pairs = func.json_each(listed).table_valued("value").alias("c")
        scope = func.json_extract(pairs.c.value, literal_column("'$[0]'"))
        amount = func.json_extract(pairs.c.value, literal_column("'$[1]'"))
        floor = func.max
    return (
        update(concurrency)
        .where(concurrency.c.scope == scope)
        .values(in_use=floor(concurrency.c.in_use + amount, 0))
    )


ADJUST = per_dialect(_adjust_statement)
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


def unpark(connection: Connection, freed: dict[str, int]) -> None:
    """Return the next parked jobs of each scope, as many as slots were freed."""
    if freed:
        connection.execute(
            _UNPARK[connection.dialect.name],
            [{"b_scope": s, "b_count": n} for s, n in freed.items()],
        )


def slots_of(held: Sequence[str | None]) -> dict[str, int]:
    """Slots per scope held by attempts whose jobs' limits JSON are ``held``."""
    slots: dict[str, int] = {}
    for document in held:
        if document:
            for scope in parse(document).scopes:
                slots[scope] = slots.get(scope, 0) + 1
    return slots


def kept_scopes(kept: Sequence[str | None]) -> list[str]:
    """The scopes of the slots whose limits JSON are ``kept``, in lock order."""
    return sorted(slots_of(kept))


def lock_kept(connection: Connection, kept: Sequence[str | None]) -> None:
    """Lock the counters of slots kept for riders before the claim locks any other
    counter (on PostgreSQL, in one order): giving them back at its end then waits for
    nobody, so no two claims can wait for each other. A claim that reads candidates
    with ``candidates_statement`` does it there."""
    if kept and connection.dialect.name == "postgresql":
        connection.execute(_LOCK_IN_ORDER, {"kept": kept_scopes(kept)}).all()


@dataclass
class CounterChange:
    """The change a claim makes to its slot counters at its end: the slots it took,
    less those of kept slots it gives back, netted per scope (``amounts``; the scopes
    given back are ``down``). The claim holds the locks of all these counters."""

    amounts: dict[str, int]

    @classmethod
    def of(cls, taken: Mapping[str, int], released: Sequence[str | None]) -> CounterChange:
        """``taken`` slots per scope; ``released``: the limits JSON of each kept slot."""
        amounts = dict(taken)
        for scope, count in slots_of(released).items():
            amounts[scope] = amounts.get(scope, 0) - count
        return cls({scope: n for scope, n in amounts.items() if n})

    def __bool__(self) -> bool:
        return bool(self.amounts)

    @property
    def down(self) -> dict[str, int]:
        return {scope: -n for scope, n in sorted(self.amounts.items()) if n < 0}

    def params(self) -> dict[str, Any]:
        """The parameters of ``ADJUST`` for this change."""
        return {"changes": sorted(self.amounts.items())}

    def apply(
        self,
        connection: Connection,
        flagged: Collection[str],
        *,
        parked: Sequence[str] = (),
        made: bool = False,
    ) -> None:
        """Make the change (unless ``made``: ``ADJUST`` ran within another statement),
        then unpark the jobs of scopes given back that have some parked: those
        ``flagged`` when their counters were locked, or that this claim ``parked`` on."""
        if self and not made:
            connection.execute(ADJUST[connection.dialect.name], self.params())
        waiting = {*flagged, *parked}
        if waiting:
            unpark(connection, {s: n for s, n in self.down.items() if s in waiting})


def release_slots(connection: Connection, held: Sequence[str | None]) -> None:
    """Give back the slots of attempts that ended; ``held`` are their jobs' limits JSON."""
    release(connection, slots_of(held))


def release(connection: Connection, freed: dict[str, int]) -> None:
    """Give back ``freed`` slots per scope, and unpark as many jobs of those with some."""
    parked: set[str] = set()
    for change in _grouped(freed):
        rows = connection.execute(_RELEASE[connection.dialect.name], change)
        parked.update(row.scope for row in rows if row.parked)
    unpark(connection, {scope: n for scope, n in sorted(freed.items()) if scope in parked})


@dataclass
class SlotMoves:
    """Where the slots of settled attempts go: handed on to riders, or released."""

    transfers: list[str] = field(default_factory=list)  # riders that now hold slots
    released: list[str | None] = field(default_factory=list)  # limits JSON of each release
    orphans: list[str] = field(default_factory=list)  # riders whose inheritance failed
    kept: list[str | None] = field(default_factory=list)  # limits JSON of slots kept


def pass_slots(finished: Sequence[Outcome], held: Mapping[tuple[str, int], Any]) -> SlotMoves:
    """Follow each chain of hand-overs among ``finished`` (in any order).

    ``held`` maps (job id, attempt) to the job's row (``limits``, ``slots_held``) for
    every attempt of ``finished``, and every heir they name, that still holds its lease.
    A slot passes to an heir only while both ends of the hand-over hold their leases;
    otherwise it is released (if it was held) and the heir is reported as an orphan,
    as is every later heir of the same chain.
    """
    moves = SlotMoves()
    batch = {(o.job_id, o.attempt): o for o in finished}
    inherited_here = {o.heir for o in finished if o.heir is not None and o.heir in batch}
    for root in finished:
        if (root.job_id, root.attempt) in inherited_here:
            continue  # reached by walking its predecessor's chain
        outcome, row = root, held.get((root.job_id, root.attempt))
        holds = row is not None and bool(row.slots_held)
        for _ in range(len(finished)):
            heir = outcome.heir
            heir_row = held.get(heir) if heir is not None else None
            if holds and heir_row is None and row is not None:
                if heir is None and outcome.keep_slots:
                    moves.kept.append(row.limits)
                else:
                    moves.released.append(row.limits)
            if heir is None:
                break
            if heir_row is None:
                holds = False
            if not holds:
                moves.orphans.append(heir[0])
            following = batch.get(heir)
            if following is None:
                if holds:
                    moves.transfers.append(heir[0])
                break
            outcome, row = following, heir_row
    return moves


def sweep_parked(connection: Connection) -> int:
    """Unpark jobs of scopes that have free slots (a safety net for races), and clear the
    parked flag of scopes with no parked job left; return how many scopes were unparked."""
    blocked = select(jobs.c.blocked_on).where(jobs.c.blocked_on.is_not(None)).distinct()
    rows = connection.execute(
        select(concurrency.c.scope, concurrency.c.in_use, concurrency.c.capacity).where(
            concurrency.c.scope.in_(blocked),
            concurrency.c.in_use < concurrency.c.capacity,
        )
    ).all()
    unpark(connection, {row.scope: int(row.capacity) - int(row.in_use) for row in rows})
    # Lock the flagged rows (in one order), then look: a claim parks jobs only while it
    # holds its scope's row, so what this sees parked is all there is.
    flagged = _lock(
        connection,
        connection.dialect.name,
        select(concurrency.c.scope).where(concurrency.c.parked == 1).order_by(concurrency.c.scope),
        skip_locked=False,
    ).scalars()
    flagged = set(flagged)
    if flagged:
        still = set(
            connection.execute(blocked.where(jobs.c.blocked_on.in_(sorted(flagged)))).scalars()
        )
        if flagged - still:
            connection.execute(
                update(concurrency)
                .where(concurrency.c.scope.in_(sorted(flagged - still)))
                .values(parked=0)
            )
    return len(rows)


_WINDOW = select(
    func.count(), func.min(rate_events.c.admitted_at), func.max(rate_events.c.admitted_at)
).where(rate_events.c.scope == bindparam("scope"), rate_events.c.admitted_at > bindparam("start"))


def admit_rates(
    connection: Connection, insert: Any, job: NewJob, now: float
) -> tuple[tuple[RateState, ...], float]:
    """Admit ``job`` under each of its rate limits, or raise ``RateLimited`` (nothing kept).

    Returns the limits' states and the admission time: ``now``, or the scope's latest
    admission if that is later (admissions of a scope are ordered by its lock).
    Admissions that left the window are deleted later, by ``prune_rate_events``.
    """
    windows: list[tuple[int, float | None]] = []
    at = now
    for check in job.rate_limits:
        # Upserting the scope's row locks it until commit: admissions of one scope
        # are decided one at a time, so the window count is exact.
        stmt = insert(rate_limits).values(
            scope=check.scope, limit=check.limit, period_seconds=check.period
        )
        connection.execute(
            stmt.on_conflict_do_update(
                index_elements=[rate_limits.c.scope],
                set_={"limit": stmt.excluded.limit, "period_seconds": stmt.excluded.period_seconds},
            )
        )
        count, oldest, latest = connection.execute(
            _WINDOW, {"scope": check.scope, "start": now - check.period}
        ).one()
        windows.append((int(count), None if oldest is None else float(oldest)))
        if latest is not None:
            at = max(at, float(latest))
    if at > now:
        # Admissions of a scope are ordered by its lock, so their times must be too: one
        # that waited behind a later admission is admitted as of that one, and its window
        # ends there. One time for all of the job's scopes.
        windows = []
        for check in job.rate_limits:
            count, oldest, _ = connection.execute(
                _WINDOW, {"scope": check.scope, "start": at - check.period}
            ).one()
            windows.append((int(count), None if oldest is None else float(oldest)))
    states: list[RateState] = []
    for check, (count, oldest) in zip(job.rate_limits, windows, strict=True):
        if count >= check.limit:
            retry_after = max(0.0, (oldest if oldest is not None else at) + check.period - at)
            raise RateLimited(
                f"rate limit {check.limit} per {check.period:g}s reached for {check.scope!r}",
                retry_after,
                state=RateState(check.scope, check.limit, check.period, 0, retry_after),
            )
        connection.execute(
            rate_events.insert().values(scope=check.scope, job_id=job.id, admitted_at=at)
        )
        reset = (oldest if oldest is not None else at) + check.period - at
        states.append(
            RateState(check.scope, check.limit, check.period, check.limit - count - 1, reset)
        )
    return tuple(states), at


# Admissions are kept a period past their window and this much more, so that no
# process whose clock is behind the pruner's still counts one that is gone.
PRUNE_MARGIN_SECONDS = 60.0


def prune_rate_events(connection: Connection, now: float) -> int:
    """Delete admissions that have left every window that could still count them."""
    period = (
        select(rate_limits.c.period_seconds)
        .where(rate_limits.c.scope == rate_events.c.scope)
        .scalar_subquery()
    )
    cutoff: Any = bindparam("now") - 2 * period - PRUNE_MARGIN_SECONDS
    result = connection.execute(
        delete(rate_events).where(rate_events.c.admitted_at <= cutoff), {"now": now}
    )
    return int(result.rowcount)


def collapse(
    connection: Connection, insert: Any, job: NewJob, check: DebounceCheck, now: float
) -> str | None:
    """Fold ``job`` into the pending job of its debounce scope; return that job's id.

    Returns ``None`` when there is no pending job: the caller inserts ``job``, which
    becomes the scope's pending job, due ``window`` from now.
    """
    stmt = insert(debounces).values(scope=check.scope, job_id=job.id, first_at=now)
    connection.execute(
        stmt.on_conflict_do_update(
            index_elements=[debounces.c.scope], set_={"scope": stmt.excluded.scope}
        )
    )  # exists now, and locked until commit
    row = connection.execute(
        select(debounces.c.job_id, debounces.c.first_at).where(debounces.c.scope == check.scope)
    ).one()
    if row.job_id != job.id:
        due = now + check.window
        if check.max_wait is not None:
            due = min(due, float(row.first_at) + check.max_wait)
        updated = connection.execute(
            update(jobs)
            .where(jobs.c.id == row.job_id, jobs.c.status == "queued", jobs.c.attempts == 0)
            .values(payload=job.payload, run_at=due)
        ).rowcount
        if updated:
            return str(row.job_id)
        connection.execute(
            update(debounces)
            .where(debounces.c.scope == check.scope)
            .values(job_id=job.id, first_at=now)
        )
    return None


def _split(scope: str) -> tuple[str, str, str]:
    task, option, key = [*scope.split("#", 2), "", ""][:3]
    return task, option, key


def state(connection: Connection, now: float) -> dict[str, list[dict[str, Any]]]:
    """Slots in use per concurrency scope, and each rate-limit window, for operators."""
    slots = [
        {
            "task": _split(row.scope)[0],
            "option": _split(row.scope)[1],
            "key": _split(row.scope)[2],
            "in_use": int(row.in_use),
            "limit": int(row.capacity),
        }
        for row in connection.execute(select(concurrency).order_by(concurrency.c.scope))
    ]
    windows = []
    for row in connection.execute(select(rate_limits).order_by(rate_limits.c.scope)):
        start = now - float(row.period_seconds)
        used, oldest = connection.execute(
            select(func.count(), func.min(rate_events.c.admitted_at)).where(
                rate_events.c.scope == row.scope, rate_events.c.admitted_at > start
            )
        ).one()
        task, option, key = _split(row.scope)
        windows.append(
            {
                "task": task,
                "option": option,
                "key": key,
                "limit": int(row.limit),
                "period": float(row.period_seconds),
                "used": int(used),
                "reset": 0.0 if oldest is None else float(oldest) - start,
            }
        )
    throttled = [
        {
            "task": _split(row.scope)[0],
            "option": _split(row.scope)[1],
            "key": _split(row.scope)[2],
            "next_start_in": max(0.0, float(row.next_at) - now),
        }
        for row in connection.execute(select(throttle_table).order_by(throttle_table.c.scope))
    ]
    return {"concurrency": slots, "rate_limits": windows, "throttles": throttled}
