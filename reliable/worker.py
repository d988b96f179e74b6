"""The worker: a dispatcher thread that claims and settles jobs, and executor threads.

The dispatcher does all the database work of the worker in as few transactions as it
can: each round settles the attempts that finished since the last one and claims as
many due jobs as there are idle threads, in one transaction. It also renews the leases
of running attempts, requeues attempts whose worker died, and enforces timeouts.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from .errors import StoreError
from .execution import after_failure, failure, run_attempt, timed_out, timeout_of
from .store import ClaimedJob, Outcome
from .store.sqlite import CHANGE_CHECK_SECONDS, ChangeWatch

if TYPE_CHECKING:
    from .app import Reliable

log = logging.getLogger("reliable.worker")


# Short jobs are claimed ahead of idle threads, so one transaction serves many of them.
PREFETCH_PER_THREAD = 8
SHORT_JOB_SECONDS = 0.05
# Riders: jobs of a full concurrency group this worker holds slots of, claimed to run
# one after another under those slots, each taking over when the last one ends. How
# many may wait per slot held (short jobs only).
RIDERS_PER_SLOT = PREFETCH_PER_THREAD
# While claimed jobs still wait for every thread, finished attempts are settled in
# batches: when a thread is about to idle, or when the oldest finished attempt has
# waited this long.
SETTLE_DELAY_SECONDS = 0.05


@dataclass(eq=False)
class _Slot:
    """A slot of each scope of a concurrency group, held by this worker's attempts one
    after another. ``valid`` turns false when the database no longer counts it (the
    attempt holding it lost its lease): then it is not handed on again."""

    group: str
    valid: bool = True


@dataclass
class _Running:
    job: ClaimedJob
    timeout: float | None
    started: float | None = None  # time.monotonic() when a thread began the attempt
    slot: _Slot | None = None

    @property
    def deadline(self) -> float | None:
        if self.timeout is None or self.started is None:
            return None
        return self.started + self.timeout


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Runs jobs of ``queues`` on ``threads`` threads in this process.

    Start it with ``start()``; ``stop(timeout)`` stops claiming, lets running attempts
    finish for up to ``timeout`` seconds (default ``RELIABLE_SHUTDOWN_GRACE``), then
    releases the rest so another worker takes them at once.
    """

    def __init__(self, app: Reliable, *, threads: int, queues: Sequence[str] | None = None) -> None:
        if threads < 1:
            raise ValueError("a worker needs at least one thread")
        self.app = app
        self.store = app.store
        self.threads = threads
        # None: the queues of every registered task, also those registered later.
        self._queues = tuple(queues) if queues else None
        self.id = new_worker_id()
        self.started_at = app.clock.now()
        self._cond = threading.Condition()
        self._finished: list[Outcome] = []
        self._finished_since = 0.0  # time.monotonic() of the oldest unsettled outcome
        self._running: dict[str, _Running] = {}
        self._abandoned: set[tuple[str, int]] = set()
        # Slot hand-overs (see RIDERS_PER_SLOT): valid slots held per group, riders
        # waiting per group, slots of finished attempts not yet settled and not handed
        # on, and slots handed on whose transfer has not been settled yet.
        self._slots: dict[str, int] = {}
        self._riders: dict[str, collections.deque[ClaimedJob]] = {}
        self._vacant: dict[str, list[tuple[_Slot, Outcome]]] = {}
        self._inherited: dict[str, _Slot] = {}
        self._stranded: list[tuple[str, int]] = []  # riders left without a slot: release
        self._work: queue.SimpleQueue[ClaimedJob | Callable[[], None] | None] = queue.SimpleQueue()
        self._wanted = True  # there may be due jobs: claim when a thread is idle
        self._wakes = 0  # counts wake() calls, so a claim cannot swallow a newer one
        self._next_due: float | None = None  # monotonic time of a retry this worker scheduled
        self._average_runtime = 1.0  # seconds per attempt, a moving average
        self._stopping = False
        self._grace_deadline = 0.0
        self._dispatcher: threading.Thread | None = None
        self._executors: list[threading.Thread] = []
        self._listener: object | None = None
        self._watch: ChangeWatch | None = None

    @property
    def queues(self) -> tuple[str, ...]:
        return self._queues or tuple(self.app.queues())

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._dispatcher is not None and self._dispatcher.is_alive()

    def start(self) -> Worker:
        if self._dispatcher is not None:
            raise RuntimeError("this worker was started already")
        self.store.add_waker(self.wake)
        if self.store.dialect == "postgresql":
            from .store.postgres import Listener

            self._listener = Listener(self.store.url, self.wake)
        else:
            self._watch = ChangeWatch(str(self.store.url.database))
        for _ in range(self.threads):
            self._start_executor()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"reliable-dispatch-{self.id}", daemon=True
        )
        self._dispatcher.start()
        log.info("worker %s started: %d threads, queues %s", self.id, self.threads, self.queues)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: finish what runs within ``timeout`` seconds, release the rest."""
        grace = self.app.settings.shutdown_grace if timeout is None else timeout
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._grace_deadline = time.monotonic() + grace
            self._cond.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join()
        for _ in self._executors:
            self._work.put(None)
        # Daemon threads: one stuck in a task's code is not waited for beyond this.
        deadline = time.monotonic() + 0.5
        for thread in self._executors:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.store.remove_waker(self.wake)
        if self._listener is not None:
            self._listener.close()  # type: ignore[attr-defined]
        if self._watch is not None:
            self._watch.close()
        log.info("worker %s stopped", self.id)

    def wake(self) -> None:
        """Tell the dispatcher that new jobs may be due."""
        with self._cond:
            self._wanted = True
            self._wakes += 1
            self._cond.notify_all()

    # -- executor threads ---------------------------------------------------------------

    def _start_executor(self) -> None:
        thread = threading.Thread(
            target=self._execute, name=f"reliable-exec-{len(self._executors)}", daemon=True
        )
        self._executors.append(thread)
        thread.start()

    def _execute(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            if not isinstance(item, ClaimedJob):
                item()
                continue
            with self._cond:
                running = self._running.get(item.id)
                if running is None or running.job.attempt != item.attempt:
                    continue  # released before it started
                running.started = began = time.monotonic()
            item = replace(item, started_at=self.app.clock.now())
            try:
                outcome = run_attempt(self.app, item)
            except BaseException as exc:
                outcome = failure(self.app, self.app.tasks.get(item.task), item, exc, retry=True)
            with self._cond:
                key = (item.id, item.attempt)
                if key in self._abandoned:
                    # Timed out or released meanwhile: the result is discarded, and a
                    # replacement thread already runs, so this one retires.
                    self._abandoned.discard(key)
                    return
                running = self._running.pop(item.id, None)
                if not self._finished:
                    self._finished_since = time.monotonic()
                self._finished.append(self._hand_on(running, outcome))
                self._average_runtime += 0.1 * (time.monotonic() - began - self._average_runtime)
                self._cond.notify_all()

    # -- the dispatcher -------------------------------------------------------------------

    def _dispatch(self) -> None:
        settings = self.app.settings
        lease = settings.lease_seconds
        now = time.monotonic()
        next_heartbeat = now
        next_recovery = now + random.uniform(0, lease / 2)
        next_poll = now + settings.poll_interval
        failures = 0
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._stopping and (not self._running or now >= self._grace_deadline):
                        break
                    hungry = self._hungry()
                    if self._finished and (hungry or self._settle_now(now)):
                        break
                    idle = not self._stopping and hungry and len(self._running) < self._capacity()
                    if idle and (self._wanted or now >= next_poll):
                        break
                    if idle and self._next_due is not None and now >= self._next_due:
                        break
                    wait_until = min(next_heartbeat, next_recovery, next_poll)
                    if self._next_due is not None:
                        wait_until = min(wait_until, self._next_due)
                    for running in self._running.values():
                        if running.deadline is not None:
                            wait_until = min(wait_until, running.deadline)
                    if self._stopping:
                        wait_until = min(wait_until, self._grace_deadline)
                    if self._finished:
                        wait_until = min(wait_until, self._finished_since + SETTLE_DELAY_SECONDS)
                    if now >= wait_until:
                        break
                    if idle and self._watch is not None:
                        self._cond.wait(min(wait_until - now, CHANGE_CHECK_SECONDS))
                        if self._watch.changed():
                            self._wanted = True
                    else:
                        self._cond.wait(wait_until - now)
                now = time.monotonic()
                if self._stopping and (not self._running or now >= self._grace_deadline):
                    self._shutdown()
                    return
                finished, self._finished = self._finished, []
                kept = self._vacate(keep=self._average_runtime < SHORT_JOB_SECONDS)
                finished.extend(self._expire_deadlines(now))
                unstarted, self._stranded = self._stranded, []
                if self._stopping:
                    # Claimed ahead but not begun: give them back now, not after the grace.
                    self._riders.clear()
                    for job_id, running in list(self._running.items()):
                        if running.started is None:
                            del self._running[job_id]
                            unstarted.append((job_id, running.job.attempt))
                wanted = 0
                # Settling may free slots, unpark waiting jobs or make a retry due, so a
                # round that settles anything also claims into the free capacity.
                if not self._stopping and (
                    self._wanted
                    or finished
                    or now >= next_poll
                    or (self._next_due is not None and now >= self._next_due)
                ):
                    wanted = self._capacity() - len(self._running)
                    if now >= next_poll:
                        next_poll = now + settings.poll_interval
                    if self._next_due is not None and now >= self._next_due:
                        self._next_due = None
            try:
                if unstarted:
                    self.store.release(self.id, unstarted, self.app.clock.now())
                if finished or wanted > 0:
                    self._claim(finished, wanted, kept)
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + lease / 3
                if now >= next_recovery:
                    if self.store.recover_expired(self.app.clock.now()):
                        self.wake()
                    if self.app.limited_at_claim() and self.store.sweep_parked():
                        self.wake()
                    if self.app.rate_limited():
                        self.store.prune_rate_events(self.app.clock.now())
                    next_recovery = now + lease / 2 * random.uniform(0.75, 1.25)
                failures = 0
            except Exception as exc:  # the dispatcher must outlive any one failure
                failures += 1
                pause = min(0.05 * 2**failures, 5.0)
                if isinstance(exc, StoreError):
                    log.warning("worker %s: %s; retrying in %.2fs", self.id, exc, pause)
                else:
                    log.exception("worker %s: dispatcher error; retrying in %.2fs", self.id, pause)
                with self._cond:
                    self._finished[:0] = finished  # settle them in the next round
                    self._finished_since = 0.0
                    self._wanted = True
                    self._cond.wait(pause)

    def _claim(self, finished: list[Outcome], wanted: int, kept: dict[str, int]) -> None:
        with self._cond:
            wakes = self._wakes
            short = self._average_runtime < SHORT_JOB_SECONDS
            held = {g: self._slots.get(g, 0) + kept.get(g, 0) for g in {*self._slots, *kept}}
            budget = {
                group: RIDERS_PER_SLOT * count - len(self._riders.get(group, ()))
                for group, count in held.items()
            }
        result = self.store.claim(
            self.id,
            self.queues,
            max(wanted, 0),
            self.app.clock.now(),
            self.app.settings.lease_seconds,
            finished,
            tasks=list(self.app.tasks),
            limited=self.app.limited_at_claim(),
            held=held if short else None,
            riders={g: n for g, n in budget.items() if n > 0} if short else None,
            riders_per_slot=RIDERS_PER_SLOT if short else 0,
        )
        discarded = set(result.discarded)
        for outcome in finished:
            if outcome.job_id in discarded:
                log.info(
                    "job %s: late result of attempt %d discarded", outcome.job_id, outcome.attempt
                )
            elif outcome.status == "failed":
                self._work.put(partial(after_failure, self.app, outcome.job_id, outcome.task))
            elif outcome.status in ("queued", "sleeping") and outcome.run_at is not None:
                due = time.monotonic() + max(0.0, outcome.run_at - self.app.clock.now())
                with self._cond:
                    if self._next_due is None or due < self._next_due:
                        self._next_due = due
        with self._cond:
            for job_id in result.orphans:
                orphaned = self._inherited.get(job_id)
                if orphaned is not None:
                    self._drop(orphaned)
            for outcome in finished:
                if outcome.heir is not None:
                    self._inherited.pop(outcome.heir[0], None)
            if (
                wanted > 0
                and len(result.jobs) < wanted
                and self._wakes == wakes
                and not result.again
            ):
                # Fewer due than asked for, and nothing new since: wait to be woken.
                self._wanted = False
            elif wanted > 0:
                self._wanted = True  # a full batch: more may be due
            riders = []
            for job in result.jobs:
                task = self.app.tasks.get(job.task)
                timeout = timeout_of(self.app, task) if task is not None else None
                running = self._running[job.id] = _Running(job, timeout)
                if job.slot_group is None:
                    self._work.put(job)
                elif job.holds_slots:
                    running.slot = _Slot(job.slot_group)
                    self._slots[job.slot_group] = self._slots.get(job.slot_group, 0) + 1
                    self._work.put(job)
                else:
                    riders.append(job)
            for job in riders:  # after the slots claimed with them are counted
                self._board(job)

    # -- concurrency slots handed on between attempts (called with the lock held) -------

    def _board(self, rider: ClaimedJob) -> None:
        """A rider takes a slot its group left vacant, waits for one, or goes back."""
        group = rider.slot_group
        assert group is not None
        vacant = self._vacant.get(group)
        if vacant:
            slot, outcome = vacant.pop()
            outcome.heir = (rider.id, rider.attempt)
            self._give(slot, rider)
        elif self._slots.get(group):
            self._riders.setdefault(group, collections.deque()).append(rider)
        else:  # the group's slots were lost meanwhile
            del self._running[rider.id]
            self._stranded.append((rider.id, rider.attempt))

    def _give(self, slot: _Slot, rider: ClaimedJob) -> None:
        self._running[rider.id].slot = slot
        self._inherited[rider.id] = slot
        self._work.put(rider)

    def _hand_on(
        self, running: _Running | None, outcome: Outcome, *, vacate: bool = True
    ) -> Outcome:
        """Give the slot of a finished attempt to the next rider of its group, if one
        waits. Otherwise the slot is released when ``outcome`` settles; until then
        (``vacate``) a rider claimed meanwhile may still take it over."""
        slot = running.slot if running is not None else None
        if slot is None or not slot.valid:
            return outcome
        waiting = self._riders.get(slot.group)
        while waiting:
            rider = waiting.popleft()
            queued = self._running.get(rider.id)
            if queued is not None and queued.job.attempt == rider.attempt:
                self._give(slot, rider)
                outcome.heir = (rider.id, rider.attempt)
                return outcome
        if vacate:
            self._vacant.setdefault(slot.group, []).append((slot, outcome))
        else:
            self._drop(slot)
        return outcome

    def _vacate(self, *, keep: bool) -> dict[str, int]:
        """Slots left vacant are settled with the finished attempts now: with ``keep``,
        each goes to a rider of its group claimed in the same transaction if there is
        one. Returns how many are kept per group."""
        kept: dict[str, int] = {}
        for group, vacant in self._vacant.items():
            for slot, outcome in vacant:
                self._drop(slot)
                if keep:
                    outcome.keep_slots = True
                    kept[group] = kept.get(group, 0) + 1
        self._vacant.clear()
        return kept

    def _drop(self, slot: _Slot) -> None:
        """Stop counting ``slot`` as held; riders left with no slot of their group go back."""
        if not slot.valid:
            return
        slot.valid = False
        left = self._slots.get(slot.group, 0) - 1
        if left > 0:
            self._slots[slot.group] = left
            return
        self._slots.pop(slot.group, None)
        for rider in self._riders.pop(slot.group, ()):
            queued = self._running.get(rider.id)
            if queued is not None and queued.job.attempt == rider.attempt:
                del self._running[rider.id]
                self._stranded.append((rider.id, rider.attempt))

    def _hungry(self) -> bool:
        """Whether the jobs claimed but not started run low: claim (and settle) now.

        With short jobs a worker holds several per thread; claiming again as soon as
        one has finished would cost a transaction for every few jobs."""
        waiting = sum(1 for running in self._running.values() if running.started is None)
        return waiting < self.threads

    def _settle_now(self, now: float) -> bool:
        """Whether to settle the finished attempts before the worker is hungry."""
        return self._stopping or now >= self._finished_since + SETTLE_DELAY_SECONDS

    def _capacity(self) -> int:
        """How many attempts to hold at once: the threads, plus a queue of short jobs."""
        if self._average_runtime < SHORT_JOB_SECONDS:
            return self.threads * PREFETCH_PER_THREAD
        return self.threads

    def _expire_deadlines(self, now: float) -> list[Outcome]:
        """Abandon attempts past their timeout (called with the lock held)."""
        expired: list[Outcome] = []
        for job_id, running in list(self._running.items()):
            deadline = running.deadline
            if deadline is not None and now >= deadline:
                job = running.job
                del self._running[job_id]
                self._abandoned.add((job.id, job.attempt))
                task = self.app.tasks.get(job.task)
                timeout = (timeout_of(self.app, task) if task is not None else None) or 0.0
                expired.append(
                    self._hand_on(running, timed_out(self.app, job, timeout), vacate=False)
                )
                log.warning("job %s: attempt %d timed out after %gs", job.id, job.attempt, timeout)
                # The stuck thread retires when its call returns; keep the pool full.
                self._start_executor()
        return expired

    def _heartbeat(self) -> None:
        with self._cond:
            held = list(self._running)
        self.store.heartbeat(
            self.id,
            held,
            self.app.clock.now(),
            self.app.settings.lease_seconds,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            threads=self.threads,
            started_at=self.started_at,
        )

    def _shutdown(self) -> None:
        """Release what still runs after the grace period; settle what finished."""
        finished, self._finished = self._finished, []
        leftovers = [(r.job.id, r.job.attempt) for r in self._running.values()]
        # Threads that pick up a job after this see it gone and skip it.
        self._abandoned.update(leftovers)
        self._running.clear()
        try:
            if finished:
                self.store.settle(self.id, finished)
            if leftovers:
                released = self.store.release(self.id, leftovers, self.app.clock.now())
                log.info("worker %s released %d unfinished jobs", self.id, released)
            self.store.remove_worker(self.id)
        except StoreError as exc:
            log.warning(
                "worker %s: could not settle at shutdown (%s); leases will expire", self.id, exc
            )
