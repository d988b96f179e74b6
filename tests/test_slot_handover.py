"""Riders: capped jobs that run one after another under slots their worker holds.

A claim that finds a capped job's scopes full leases it as a *rider* when the claiming
worker holds slots of the same scopes; it starts when one of that worker's attempts of
the group ends, taking over its slots, and settling hands the slots on (or releases
them) fenced on both leases. These tests check the hand-over rules on their own, then
through the store on both databases, then with worker threads running short jobs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from reliable import Reliable
from reliable.execution import run_attempt
from reliable.store import ClaimedJob, Outcome
from reliable.store.scopes import parse
from reliable.store.slots import pass_slots

LIMITS = '{"keys":{},"concurrency":[["work#concurrency0#",2]]}'
GROUP = parse(LIMITS).group


@dataclass
class Row:
    limits: str | None
    slots_held: int


def done(job: str, heir: str | None = None, *, keep: bool = False) -> Outcome:
    return Outcome(
        job,
        1,
        "succeeded",
        0.0,
        1.0,
        "null",
        heir=(heir, 1) if heir else None,
        keep_slots=keep,
    )


def held(**rows: int) -> dict[tuple[str, int], Any]:
    """Rows still leased to the worker: job id -> slots_held."""
    return {(job, 1): Row(LIMITS, slots) for job, slots in rows.items()}


# -- the hand-over rules -------------------------------------------------------------------


def test_a_slot_passed_along_a_chain_settled_at_once_is_released_once() -> None:
    moves = pass_slots([done("a", "b"), done("b", "c"), done("c")], held(a=1, b=0, c=0))
    assert (moves.released, moves.transfers, moves.orphans) == ([LIMITS], [], [])


def test_a_slot_handed_to_a_rider_still_running_is_transferred() -> None:
    moves = pass_slots([done("a", "b")], held(a=1, b=0))
    assert (moves.released, moves.transfers, moves.orphans) == ([], ["b"], [])


def test_the_order_of_the_outcomes_does_not_matter() -> None:
    # A timed-out attempt's outcome is made after those of the riders that followed it.
    moves = pass_slots([done("b", "c"), done("a", "b")], held(a=1, b=0, c=0))
    assert (moves.released, moves.transfers, moves.orphans) == ([], ["c"], [])


def test_an_heir_that_lost_its_lease_gets_nothing_and_the_slot_is_released() -> None:
    moves = pass_slots([done("a", "b")], held(a=1))  # b was cancelled meanwhile
    assert (moves.released, moves.transfers, moves.orphans) == ([LIMITS], [], ["b"])


def test_a_holder_that_lost_its_lease_hands_on_nothing_down_the_whole_chain() -> None:
    # a's slot was already given back by whoever took its lease; b and c ran without one.
    moves = pass_slots([done("a", "b"), done("b", "c")], held(b=0, c=0))
    assert (moves.released, moves.transfers, moves.orphans) == ([], [], ["b", "c"])


def test_a_slot_kept_for_adoption_is_neither_released_nor_transferred() -> None:
    moves = pass_slots([done("a", keep=True), done("x")], held(a=1, x=1))
    assert (moves.kept, moves.released) == ([LIMITS], [LIMITS])


# -- through the store ---------------------------------------------------------------------


def claim(
    rel: Reliable, worker: str, limit: int, finished: list[Outcome] | None = None, **options: Any
) -> Any:
    return rel.store.claim(
        worker,
        ["default"],
        limit,
        rel.clock.now(),
        30,
        finished or [],
        tasks=list(rel.tasks),
        **options,
    )


def run(rel: Reliable, job: ClaimedJob, heir: ClaimedJob | None = None, **changes: Any) -> Outcome:
    outcome = run_attempt(rel, job)
    return replace(outcome, heir=(heir.id, heir.attempt) if heir else None, **changes)


def in_use(rel: Reliable) -> int:
    return sum(slot["in_use"] for slot in rel.flow_state()["concurrency"])


def slots_held(rel: Reliable, job: ClaimedJob) -> int:
    row = rel.store.get_job(job.id)
    assert row is not None
    return row.slots_held


def test_a_full_group_the_worker_holds_is_claimed_as_riders_not_parked(rel: Reliable) -> None:
    @rel.task(name="work", concurrency=2)
    def work(i: int) -> int:
        return i

    ids = [work.enqueue(i).id for i in range(6)]
    first = claim(rel, "w", 10, riders_per_slot=2).jobs
    holders = [job for job in first if job.holds_slots]
    riders = [job for job in first if not job.holds_slots]
    assert len(holders) == 2 and len(riders) == 4  # two riders per slot taken
    assert {job.slot_group for job in first} == {GROUP}
    assert in_use(rel) == 2
    # Another worker holds none of the group: the cap is full for it.
    assert claim(rel, "other", 10, riders_per_slot=2).jobs == []
    assert sorted(job.id for job in first) == sorted(ids)


def test_settling_hands_the_slot_to_the_heir_without_releasing_it(rel: Reliable) -> None:
    @rel.task(name="work", concurrency=1)
    def work(i: int) -> int:
        return i

    for i in range(2):
        work.enqueue(i)
    holder, rider = claim(rel, "w", 2, riders_per_slot=1).jobs
    assert holder.holds_slots and not rider.holds_slots
    result = claim(rel, "w", 0, [run(rel, holder, heir=rider)])
    assert result.orphans == []
    assert (slots_held(rel, holder), slots_held(rel, rider)) == (0, 1)
    assert in_use(rel) == 1  # the slot moved; it was never free
    claim(rel, "w", 0, [run(rel, rider)])
    assert in_use(rel) == 0


def test_an_heir_cancelled_before_the_hand_over_holds_the_slot_until_it_ends(
    rel: Reliable,
) -> None:
    @rel.task(name="work", concurrency=1)
    def work(i: int) -> int:
        return i

    for i in range(2):
        work.enqueue(i)
    holder, rider = claim(rel, "w", 2, riders_per_slot=1).jobs
    assert rel.cancel(rider.id)
    # Its worker may already have started it: the slot passes to it all the same...
    result = claim(rel, "w", 0, [run(rel, holder, heir=rider)])
    assert result.orphans == []
    assert in_use(rel) == 1
    # ...and comes back when its attempt ends; the job stays cancelled.
    claim(rel, "w", 0, [run(rel, rider)])
    assert in_use(rel) == 0
    assert rel.get_job(rider.id).status == "cancelled"


def test_a_kept_slot_goes_to_a_rider_claimed_in_the_same_transaction(rel: Reliable) -> None:
    @rel.task(name="work", concurrency=1)
    def work(i: int) -> int:
        return i

    for i in range(3):
        work.enqueue(i)
    (holder,) = claim(rel, "w", 1, riders_per_slot=1).jobs
    finished = [run(rel, holder, keep_slots=True)]
    (adopter,) = claim(rel, "w", 1, finished, held={GROUP: 1}, riders={GROUP: 1}).jobs
    assert adopter.holds_slots  # it took over the kept slot
    assert in_use(rel) == 1
    # Kept, but nobody of its group claimed with it: released after the claim.
    result = claim(rel, "w", 0, [run(rel, adopter, keep_slots=True)])
    assert result.again
    assert in_use(rel) == 0


def test_parked_jobs_of_a_held_group_are_boarded_as_riders(rel: Reliable) -> None:
    @rel.task(name="work", concurrency=1)
    def work(i: int) -> int:
        return i

    ids = [work.enqueue(i).id for i in range(5)]
    (holder,) = claim(rel, "a", 1).jobs
    assert claim(rel, "b", 5).jobs == []  # the scope is full: the other four are parked
    waiting = [i for i in ids if i != holder.id]
    assert all(blocked_on(rel, i) for i in waiting)
    riders = claim(rel, "a", 5, held={GROUP: 1}, riders={GROUP: 4}).jobs
    assert sorted(job.id for job in riders) == sorted(waiting)
    assert not any(job.holds_slots for job in riders)
    assert not any(blocked_on(rel, i) for i in waiting)
    assert in_use(rel) == 1


def blocked_on(rel: Reliable, job_id: str) -> str | None:
    row = rel.store.get_job(job_id)
    assert row is not None
    return row.blocked_on


# -- worker threads ------------------------------------------------------------------------


def drain(app: Reliable, total: int) -> None:
    """Run a worker of 4 threads until ``total`` jobs have succeeded, then stop it."""
    app.start_worker(threads=4)
    try:
        deadline = time.monotonic() + 60
        while app.store.count_by_status().get("succeeded", 0) < total:
            assert time.monotonic() < deadline, app.store.count_by_status()
            time.sleep(0.02)
    finally:
        app.stop_worker()


def test_short_jobs_under_a_cap_run_as_riders_and_never_exceed_it(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False)
    lock = threading.Lock()
    running = most = 0

    @app.task(name="work", concurrency=2)
    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.0005)
        with lock:
            running -= 1
        return i

    handles = [work.enqueue(i) for i in range(400)]
    rounds = 0
    claim_ = app.store.claim

    def counting_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal rounds
        rounds += 1
        return claim_(*args, **kwargs)

    app.store.claim = counting_claim  # type: ignore[method-assign]
    drain(app, len(handles))
    assert most == 2
    assert in_use(app) == 0
    assert all(app.get_job(h.id).attempts == 1 for h in handles)
    # Riders: many jobs per transaction, though only two may run at once.
    assert rounds < len(handles) / 4
    app.close()


def test_stopping_a_worker_with_riders_waiting_gives_everything_back(db_url: str) -> None:
    """Stopped mid-drain, a worker releases the riders it had not started (uncounted)
    and the slots it held; another worker then finishes every job, each once."""
    app = Reliable(db_url, embedded_worker=False)
    runs: dict[int, int] = {}
    lock = threading.Lock()

    @app.task(name="work", concurrency=2)
    def work(i: int) -> int:
        with lock:
            runs[i] = runs.get(i, 0) + 1
        time.sleep(0.001)
        return i

    handles = [work.enqueue(i) for i in range(600)]
    app.start_worker(threads=4)
    deadline = time.monotonic() + 30
    while app.store.count_by_status().get("succeeded", 0) < 100:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    app.stop_worker(timeout=1)

    counts = app.store.count_by_status()
    assert counts.get("running", 0) == 0, counts
    assert counts.get("succeeded", 0) < len(handles)  # stopped mid-drain
    assert in_use(app) == 0
    drain(app, len(handles))
    assert sorted(runs) == list(range(len(handles)))
    assert set(runs.values()) == {1}
    assert all(app.get_job(h.id).attempts == 1 for h in handles)
    assert in_use(app) == 0
    app.close()
