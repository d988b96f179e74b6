"""The worker: a dispatcher thread that claims and settles jobs, and executor threads.

The dispatcher does all the database work of the worker in as few transactions as it
can: each round settles the attempts that finished since the last one and claims as
many due jobs as there are idle threads, in one transaction. It also requeues attempts
whose worker died and tells attempts past their timeout to stop. Leases are renewed by
a ``LeaseKeeper`` on a timer of its own.

A thread cannot be killed. An attempt that overruns its timeout, is cancelled, or is
still running when the worker stops is told to stop (at its next step boundary), and
keeps its job's lease and its concurrency slots until its function has returned: a cap
is never exceeded, and one job never runs twice at once. Its thread is replaced so
the others keep working, and it is reported in the log until it returns.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from .aio import NOTIFY_EVERY, Lanes
from .background import backoff
from .context import CANCELLED, LEASE_LOST, SHUTDOWN, AttemptControl
from .errors import StoreError
from .execution import (
    after_failure,
    attempt_control,
    failure,
    released,
    run_attempt,
    run_attempt_async,
    timeout_of,
)
from .handover import Running, SlotHandOver
from .leases import LeaseKeeper, recover
from .logs import install_default_handler
from .overruns import Overruns
from .registry import Registry
from .schedules import Timetable
from .store import AttemptStates, ClaimedJob, Outcome
from .store.sqlite import CHANGE_CHECK_SECONDS, ChangeWatch
from .timekeeper import Timekeeper

log = logging.getLogger("reliable.worker")


# Short jobs are claimed ahead of idle threads, so one transaction serves many of them: per
# thread PREFETCH_LEAST, or up to PREFETCH_PER_THREAD as make about PREFETCH_SECONDS of work.
PREFETCH_LEAST, PREFETCH_PER_THREAD, PREFETCH_SECONDS = 8, 32, 0.05
SHORT_JOB_SECONDS = 0.05
# Riders: jobs of a full concurrency group this worker holds slots of, claimed to run
# one after another under those slots, each taking over when the last one ends. How
# many may wait per slot held (short jobs only).
RIDERS_PER_SLOT = 8
# While claimed jobs still wait for every thread, finished attempts are settled in batches:
# when a thread is about to idle, or when the oldest finished attempt has waited this long.
SETTLE_DELAY_SECONDS = 0.05
# How long giving back at exit waits for the dispatcher's round in progress to end.
EXIT_WAIT_SECONDS = 5.0


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


def _release_at_exit(ref: weakref.ref[Worker]) -> None:
    worker = ref()
    if worker is not None:
        worker.release_leftovers()


class Worker:
    """Runs jobs of ``queues`` on ``threads`` threads in this process (``async def``
    tasks on an event loop beside them: see ``aio``).

    Start it with ``start()``; ``stop(timeout)`` stops claiming, lets running attempts
    finish for up to ``timeout`` seconds (default ``RELIABLE_SHUTDOWN_GRACE``), gives
    back at once the jobs it claimed ahead, and tells the attempts still running to
    stop. Those keep their jobs until they return (or until the process exits, which
    gives them back at once). It also enqueues the due ticks of ``timetable`` and
    removes finished jobs past ``RELIABLE_RESULT_TTL`` (see ``Timekeeper``).
    """

    def __init__(
        self,
        registry: Registry,
        *,
        threads: int,
        queues: Sequence[str] | None = None,
        timetable: Timetable | None = None,
    ) -> None:
        if threads < 1:
            raise ValueError("a worker needs at least one thread")
        self.registry = registry
        self.runtime = runtime = registry.runtime
        self.store = runtime.store
        self.threads = threads
        # None: the queues of every registered task, also those registered later.
        self._queues = tuple(queues) if queues else None
        self.id = new_worker_id()
        self.started_at = runtime.clock.now()
        self._cond = threading.Condition()
        self._finished: list[Outcome] = []
        self._finished_since = 0.0  # time.monotonic() of the oldest unsettled outcome
        self._running: dict[str, Running] = {}
        self._work: queue.SimpleQueue[ClaimedJob | Callable[[], None] | None] = queue.SimpleQueue()
        # Slots handed on between this worker's attempts (see RIDERS_PER_SLOT).
        # Which jobs run on the event loop beside the threads (started with the worker).
        attempt = partial(run_attempt_async, registry)
        self._lanes = Lanes(registry, threads, self._begin, attempt, self._end)
        self._start_job = partial(self._lanes.hand, self._work.put)
        self._handover = SlotHandOver(self._running, self._start_job)
        self._overruns = Overruns(
            self._running, self._start_executor, runtime.settings.lease_seconds
        )
        self._wanted = True  # there may be due jobs: claim when a thread is idle
        self._wakes = 0  # counts wake() calls, so a claim cannot swallow a newer one
        self._next_due: float | None = None  # monotonic time of a retry this worker scheduled
        self._average_runtime = 1.0  # seconds per attempt, a moving average
        self._stopping = False
        self._draining = False  # past the grace period: attempts still running told to stop
        self._grace_deadline = 0.0
        self._released = threading.Event()  # stop() may return: done, or draining
        self._round = threading.Lock()  # held while the dispatcher writes to the store
        self._dispatcher: threading.Thread | None = None
        self._executors: list[threading.Thread] = []
        self._listener: object | None = None
        self._watch: ChangeWatch | None = None
        self._keeper: LeaseKeeper | None = None
        # Cron ticks and retention (RELIABLE_RESULT_TTL), on a thread of their own.
        self._timekeeper = Timekeeper(runtime, timetable, self.id)
        self._exit_hook = partial(_release_at_exit, weakref.ref(self))

    @property
    def queues(self) -> tuple[str, ...]:
        return self._queues or tuple(self.registry.queues())

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the worker still runs: claiming, or finishing attempts after ``stop``."""
        return self._dispatcher is not None and self._dispatcher.is_alive()

    def start(self) -> Worker:
        if self._dispatcher is not None:
            raise RuntimeError("this worker was started already")
        install_default_handler()
        self.store.hold()
        self.store.add_waker(self.wake)
        if self.store.dialect == "postgresql":
            from .store.postgres import Listener

            self._listener = Listener(self.store.url, self.wake)
        else:
            self._watch = ChangeWatch(str(self.store.url.database))
        self._keeper = LeaseKeeper(
            self.store,
            self.runtime.clock,
            self.id,
            self.runtime.settings.lease_seconds,
            self._held,
            self._learn,
            self._about,
        )
        self._keeper.start()
        self._timekeeper.start()
        self._lanes.start(f"reliable-loop-{self.id}")
        for _ in range(self.threads):
            self._start_executor()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"reliable-dispatch-{self.id}", daemon=True
        )
        self._dispatcher.start()
        atexit.register(self._exit_hook)
        what = f"{self.threads} threads and up to {self._lanes.limit} async attempts"
        log.info("worker %s started: %s, queues %s", self.id, what, self.queues)
        return self

    def stop(self, timeout: float | None = None, *, exiting: bool = False) -> None:
        """Stop gracefully: finish what runs within ``timeout`` seconds, give back the
        jobs claimed ahead at once, and tell what still runs then to stop.

        Returns once nothing runs, or once the grace period is over; attempts still
        running then keep their jobs' leases until they return, and their jobs are given
        back, uncounted, when they stop at a step boundary (or at interpreter exit).
        ``exiting``: the process ends right after, and the threads still running with
        it: their jobs are given back now.
        """
        grace = self.runtime.settings.shutdown_grace if timeout is None else timeout
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._grace_deadline = time.monotonic() + grace
            self._cond.notify_all()
        if self._dispatcher is None:
            return
        self._released.wait()
        with self._cond:
            leftovers = [r.job.id for r in self._running.values()]
        if not leftovers:
            self._dispatcher.join()
            deadline = time.monotonic() + 0.5
            for thread in self._executors:
                thread.join(max(0.0, deadline - time.monotonic()))
            return
        if exiting:
            self.release_leftovers()
            return
        log.warning(
            "worker %s stopped claiming; %d attempts outlived the grace period and keep "
            "their jobs until they return: %s",
            self.id,
            len(leftovers),
            ", ".join(leftovers),
        )

    def wake(self) -> None:
        """Tell the dispatcher that new jobs may be due."""
        with self._cond:
            self._wanted = True
            self._wakes += 1
            self._cond.notify_all()

    def cancelled(self, job_ids: Iterable[str]) -> None:
        """Jobs were cancelled: those waiting here never start, running ones are told to
        stop. Called at once by ``Reliable.cancel`` in this process."""
        with self._cond:
            for job_id in job_ids:
                running = self._running.get(job_id)
                if running is not None:
                    self._cancel(running)
            self._cond.notify_all()

    def overdue(self) -> list[tuple[str, int, float]]:
        """Attempts running past their timeout: (job id, attempt, seconds over)."""
        with self._cond:
            return self._overruns.listed(time.monotonic())

    def release_leftovers(self) -> None:
        """At interpreter exit: settle the attempts that have ended and give back at
        once the jobs this worker still holds (the threads running them end with the
        process), so another worker takes them now instead of when their leases expire.

        The dispatcher's round in progress ends first (for up to a few seconds): what
        it settles is not settled twice, and nothing ended is left unsettled."""
        held = self._round.acquire(timeout=EXIT_WAIT_SECONDS)
        with self._cond:
            leftovers = [(r.job.id, r.job.attempt) for r in self._running.values()]
            finished, self._finished = self._finished, []
        try:
            if finished:
                self.store.settle(self.id, finished)
            count = self.store.release(self.id, leftovers, self.runtime.clock.now())
            self.store.remove_worker(self.id)
        except StoreError as exc:
            log.warning("worker %s: could not give back its jobs at exit (%s)", self.id, exc)
            return
        finally:
            if held:
                self._round.release()
        log.info("worker %s gave back %d jobs still running at exit", self.id, count)

    # -- what the lease keeper learns -----------------------------------------------------

    def _about(self) -> dict[str, Any]:
        """What the workers table says of this worker (tasks may be registered later)."""
        return {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "threads": self.threads,
            "started_at": self.started_at,
            "tasks": list(self.registry.tasks),
        }

    def _held(self) -> list[tuple[str, int]]:
        with self._cond:
            return [(job_id, r.job.attempt) for job_id, r in self._running.items()]

    def _learn(self, states: AttemptStates) -> None:
        with self._cond:
            for job_id, attempt in states.cancelled:
                running = self._running.get(job_id)
                if running is not None and running.job.attempt == attempt:
                    self._cancel(running)
            for job_id, attempt in states.lost:
                running = self._running.get(job_id)
                if running is None or running.job.attempt != attempt:
                    continue
                if running.started is None:
                    del self._running[job_id]  # recovered elsewhere: its slots went with it
                    if running.slot is not None:
                        self._handover.drop(running.slot)
                elif running.control is not None and running.control.stop(LEASE_LOST):
                    log.warning(
                        "job %s: attempt %d lost its lease; it stops at its next step",
                        job_id,
                        attempt,
                    )
            self._cond.notify_all()

    def _cancel(self, running: Running) -> None:
        """(With the lock held.) A job cancelled: drop it if it has not started."""
        job = running.job
        if running.started is None:
            del self._running[job.id]
            outcome = released(job, self.runtime.clock.now(), status="cancelled")
            self._add_finished(self._handover.hand_on(running, outcome))
        elif running.control is not None and running.control.stop(CANCELLED):
            log.info(
                "job %s: cancelled while attempt %d runs; it stops at its next step",
                job.id,
                job.attempt,
            )

    def _add_finished(self, outcome: Outcome) -> None:
        if not self._finished:
            self._finished_since = time.monotonic()
        self._finished.append(outcome)

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
            begun = self._begin(item)
            if begun is None:
                continue  # given back, or cancelled, before it started
            job, control, began = begun
            try:
                outcome = run_attempt(self.registry, job, control, self._lanes.loop)
            except BaseException as exc:
                outcome = failure(
                    self.registry, self.registry.tasks.get(job.task), job, exc, retry=True
                )
            if self._end(job, outcome, began, thread=True):
                return  # a replacement thread took this one's place when it overran

    def _begin(self, item: ClaimedJob) -> tuple[ClaimedJob, AttemptControl, float] | None:
        """Mark ``item`` started; ``None`` if it was given back or cancelled meanwhile."""
        with self._cond:
            running = self._running.get(item.id)
            if running is None or running.job.attempt != item.attempt:
                return None
            running.started = began = time.monotonic()
            job = item.begun(self.runtime.clock.now())
            control = running.control = attempt_control(self.registry, job)
        return job, control, began

    def _end(self, job: ClaimedJob, outcome: Outcome, began: float, *, thread: bool) -> bool:
        """Hand in the outcome of an attempt that has ended; whether it had overrun."""
        with self._cond:
            running = self._running.pop(job.id, None)
            self._add_finished(self._handover.hand_on(running, outcome))
            if thread or len(self._finished) % NOTIFY_EVERY == 1 or not self._running:
                self._cond.notify_all()
            if running is not None and running.overdue:
                self._overruns.returned(running, time.monotonic())
                return True
            if thread:
                self._average_runtime += 0.1 * (time.monotonic() - began - self._average_runtime)
        return False

    # -- the dispatcher -------------------------------------------------------------------

    def _dispatch(self) -> None:
        settings = self.runtime.settings
        lease = settings.lease_seconds
        now = time.monotonic()
        next_recovery = now + random.uniform(0, lease / 2)
        next_poll = now + settings.poll_interval
        failures = 0
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._stopping and not self._running:
                        break
                    if self._stopping and not self._draining and now >= self._grace_deadline:
                        break
                    hungry = self._lanes.hungry(self._running.values())
                    if self._finished and (hungry or self._settle_now(now)):
                        break
                    idle = not self._stopping and hungry and max(self._room()) > 0
                    if idle and (self._wanted or now >= next_poll):
                        break
                    if idle and self._next_due is not None and now >= self._next_due:
                        break
                    wait_until = min(next_recovery, next_poll, self._overruns.report(now))
                    if self._next_due is not None:
                        wait_until = min(wait_until, self._next_due)
                    for running in self._running.values():
                        if running.deadline is not None:
                            wait_until = min(wait_until, running.deadline)
                    if self._stopping and not self._draining:
                        wait_until = min(wait_until, self._grace_deadline)
                    if self._finished:
                        wait_until = min(wait_until, self._finished_since + SETTLE_DELAY_SECONDS)
                    if now >= wait_until:
                        break
                    if idle and self._watch is not None:
                        self._cond.wait(min(wait_until - now, CHANGE_CHECK_SECONDS))
                        if self._watch.changed():  # another process wrote: a wake-up
                            self._wanted, self._wakes = True, self._wakes + 1
                    else:
                        self._cond.wait(wait_until - now)
                now = time.monotonic()
                done = self._stopping and not self._running
            if done:
                self._shutdown()
                return
            with self._cond:
                if self._stopping and not self._draining and now >= self._grace_deadline:
                    self._drain()
                finished, self._finished = self._finished, []
                kept = self._handover.vacate(keep=self._average_runtime < SHORT_JOB_SECONDS)
                self._overruns.expire(now)
                unstarted, self._handover.stranded = self._handover.stranded, []
                if self._stopping:
                    # Claimed ahead but not begun: give them back now, not after the grace.
                    self._handover.riders.clear()
                    for job_id, running in list(self._running.items()):
                        if running.started is None:
                            del self._running[job_id]
                            unstarted.append((job_id, running.job.attempt))
                wanted = (0, 0)
                # Settling may free slots, unpark waiting jobs or make a retry due, so a
                # round that settles anything also claims into the free capacity.
                if not self._stopping and (
                    self._wanted
                    or finished
                    or now >= next_poll
                    or (self._next_due is not None and now >= self._next_due)
                ):
                    wanted = self._room()
                    if now >= next_poll:
                        next_poll = now + settings.poll_interval
                    if self._next_due is not None and now >= self._next_due:
                        self._next_due = None
            try:
                with self._round:
                    if unstarted:
                        self.store.release(self.id, unstarted, self.runtime.clock.now())
                    if finished or max(wanted) > 0:
                        self._claim(finished, wanted, kept)
                    finished = []
                    now = time.monotonic()
                    if now >= next_recovery:
                        if recover(self.store, self.registry, self.runtime.clock.now()):
                            self.wake()
                        next_recovery = now + lease / 2 * random.uniform(0.75, 1.25)
                failures = 0
            except Exception as exc:  # the dispatcher must outlive any one failure
                failures += 1
                pause = backoff(failures, 5.0)
                if isinstance(exc, StoreError):
                    log.warning("worker %s: %s; retrying in %.2fs", self.id, exc, pause)
                else:
                    log.exception("worker %s: dispatcher error; retrying in %.2fs", self.id, pause)
                with self._cond:
                    self._finished[:0] = finished  # settle them in the next round
                    self._finished_since = 0.0
                    self._wanted = True
                    self._cond.wait(pause)

    def _claim(
        self, finished: list[Outcome], wanted: tuple[int, int], kept: dict[str, int]
    ) -> None:
        """Settle ``finished`` and claim up to ``wanted`` jobs: (for threads, for the
        loop), each lane's tasks apart; one transaction per lane with room."""
        with self._cond:
            wakes = self._wakes
            short = self._average_runtime < SHORT_JOB_SECONDS
            held = self._handover.held(kept)
            budget = {
                group: RIDERS_PER_SLOT * count - len(self._handover.riders.get(group, ()))
                for group, count in held.items()
            }
        queues, tasks = self.registry.claimable(self._queues, self.runtime.paused())
        boarding = {g: n for g, n in budget.items() if n > 0}
        riding = {"held": held, "riders": boarding, "riders_per_slot": RIDERS_PER_SLOT}
        claimed = self._lanes.claim(
            self.id, queues, tasks, wanted, finished, riding if short else {}, wakes
        )
        result = claimed.first
        discarded = set(result.discarded)
        for outcome in finished:
            if outcome.job_id in discarded:
                log.info(
                    "job %s: late result of attempt %d discarded", outcome.job_id, outcome.attempt
                )
            elif outcome.status == "failed":
                self._work.put(partial(after_failure, self.registry, outcome.job_id, outcome.task))
            elif outcome.status in ("queued", "sleeping") and outcome.run_at is not None:
                due = time.monotonic() + max(0.0, outcome.run_at - self.runtime.clock.now())
                with self._cond:
                    if self._next_due is None or due < self._next_due:
                        self._next_due = due
        with self._cond:
            self._handover.settled(finished, result.orphans)
            if max(wanted) > 0 and not claimed.full and self._wakes == wakes and not claimed.again:
                # Fewer due than asked for, and nothing new since: wait to be woken.
                self._wanted = False
            elif max(wanted) > 0:
                self._wanted = True  # a full batch: more may be due
            riders = []
            for job in claimed.jobs:
                task = self.registry.tasks.get(job.task)
                timeout = timeout_of(self.registry, task) if task is not None else None
                if self._lanes.on_loop(job.task):
                    timeout = None  # its coroutine is cancelled on the loop, at its deadline
                running = self._running[job.id] = Running(job, timeout)
                if job.slot_group is None:
                    self._start_job(job)
                elif job.holds_slots:
                    self._handover.take(running)
                    self._start_job(job)
                else:
                    riders.append(job)
            for job in riders:  # after the slots claimed with them are counted
                self._handover.board(job)

    def _room(self) -> tuple[int, int]:
        """How many more attempts to claim: for threads, for the loop."""
        return self._lanes.room(self._running.values(), self._capacity())

    def _settle_now(self, now: float) -> bool:
        """Whether to settle the finished attempts before the worker is hungry."""
        return self._stopping or now >= self._finished_since + SETTLE_DELAY_SECONDS

    def _capacity(self) -> int:
        """How many attempts to hold at once: the threads, plus a queue of short jobs."""
        # A thread stuck past its timeout was replaced: its attempt does not count.
        if self._average_runtime < SHORT_JOB_SECONDS:
            ahead = PREFETCH_SECONDS / max(self._average_runtime, 1e-6)
            per_thread = max(PREFETCH_LEAST, min(PREFETCH_PER_THREAD, int(ahead)))
            return self.threads * per_thread + self._overruns.count
        return self.threads + self._overruns.count

    def _drain(self) -> None:
        """The grace period is over (lock held): attempts still running are told to stop;
        they keep their jobs until they return, and ``stop()`` returns now."""
        self._draining = True
        for running in self._running.values():
            if running.control is not None:
                running.control.stop(SHUTDOWN)
        self._released.set()

    def _shutdown(self) -> None:
        """Nothing runs any more: settle what finished, leave."""
        with self._cond:
            finished, self._finished = self._finished, []
        try:
            if finished:
                self.store.settle(self.id, finished)
            self.store.remove_worker(self.id)
        except StoreError as exc:
            log.warning(
                "worker %s: could not settle at shutdown (%s); leases will expire", self.id, exc
            )
        for _ in self._executors:
            self._work.put(None)
        self._lanes.stop()  # loop resources closed, then the loop
        if self._keeper is not None:
            self._keeper.close()
        self._timekeeper.close()
        self.store.remove_waker(self.wake)
        if self._listener is not None:
            self._listener.close()  # type: ignore[attr-defined]
        if self._watch is not None:
            self._watch.close()
        self.store.let_go()
        atexit.unregister(self._exit_hook)
        self._released.set()
        log.info("worker %s stopped", self.id)
