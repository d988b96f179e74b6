"""Concurrency slots: the counter rows of each scope, changed when slots are taken,
handed on or given back, and the jobs parked on a full scope, unparked as slots free up.

On PostgreSQL counter rows are locked in one order (or skipped when another claimer
holds them), so no two transactions wait for each other; SQLite has one writer. A
periodic sweep repairs what a race could let slip."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Integer,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    update,
)

from .lists import JSONList, one_of, per_dialect
from .records import Outcome
from .schema import (
    concurrency,
    jobs,
)
from .scopes import kept_scopes, slots_of

LOCK_KEPT = (
    select(concurrency.c.scope)
    .where(one_of(concurrency.c.scope, "kept", "postgresql"))
    .order_by(concurrency.c.scope)
    .with_for_update()
)


def lock_rows(connection: Connection, dialect: str, statement: Any, *, skip_locked: bool) -> Any:
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


def unpark(connection: Connection, freed: dict[str, int]) -> None:
    """Return the next parked jobs of each scope, as many as slots were freed."""
    if freed:
        connection.execute(
            _UNPARK[connection.dialect.name],
            [{"b_scope": s, "b_count": n} for s, n in freed.items()],
        )


def lock_kept(connection: Connection, kept: Sequence[str | None]) -> None:
    """Lock the counters of slots kept for riders before the claim locks any other
    counter (on PostgreSQL, in one order): giving them back at its end then waits for
    nobody, so no two claims can wait for each other. A claim that reads candidates
    with ``candidates_statement`` does it there."""
    if kept and connection.dialect.name == "postgresql":
        connection.execute(LOCK_KEPT, {"kept": kept_scopes(kept)}).all()


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
    flagged = lock_rows(
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
