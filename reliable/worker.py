"""The worker: a dispatcher thread that claims and settles jobs, and executor threads.

The dispatcher does all the database work of the worker in as few transactions as it
can: each round settles the attempts that finished since the last one and claims as
many due jobs as there are idle threads, in one transaction. It also renews the leases
of running attempts, requeues attempts whose worker died, and enforces timeouts.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from .errors import StoreError
from .execution import after_failure, failure, run_attempt, timed_out, timeout_of
from .store import ClaimedJob, Outcome
from .store.sqlite import CHANGE_CHECK_SECONDS, ChangeWatch

if TYPE_CHECKING:
    from .app import Reliable

log = logging.getLogger("reliable.worker")


@dataclass
class _Running:
    job: ClaimedJob
    deadline: float | None  # time.monotonic() after which the attempt is abandoned


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """Runs jobs of ``queues`` on ``threads`` threads in this process.

    Start it with ``start()``; ``stop(timeout)`` stops claiming, lets running attempts
    finish for up to ``timeout`` seconds (default ``RELIABLE_SHUTDOWN_GRACE``), then
    releases the rest so another worker takes them at once.
    """

    def __init__(self, app: Reliable, *, threads: int, queues: Sequence[str]) -> None:
        if threads < 1:
            raise ValueError("a worker needs at least one thread")
        self.app = app
        self.store = app.store
        self.threads = threads
        self.queues = tuple(queues)
        self.id = new_worker_id()
        self.started_at = app.clock.now()
        self._cond = threading.Condition()
        self._finished: list[Outcome] = []
        self._running: dict[str, _Running] = {}
        self._abandoned: set[tuple[str, int]] = set()
        self._work: queue.SimpleQueue[ClaimedJob | Callable[[], None] | None] = queue.SimpleQueue()
        self._wanted = True  # there may be due jobs: claim when a thread is idle
        self._next_due: float | None = None  # monotonic time of a retry this worker scheduled
        self._stopping = False
        self._grace_deadline = 0.0
        self._dispatcher: threading.Thread | None = None
        self._executors: list[threading.Thread] = []
        self._listener: object | None = None
        self._watch: ChangeWatch | None = None

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
        for thread in self._executors:
            thread.join(timeout=0.5)
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
                self._running.pop(item.id, None)
                self._finished.append(outcome)
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
                    if self._finished:
                        break
                    idle = not self._stopping and len(self._running) < self.threads
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
                finished.extend(self._expire_deadlines(now))
                wanted = 0
                if not self._stopping and (
                    self._wanted
                    or now >= next_poll
                    or (self._next_due is not None and now >= self._next_due)
                ):
                    wanted = self.threads - len(self._running)
                    if now >= next_poll:
                        next_poll = now + settings.poll_interval
                    if self._next_due is not None and now >= self._next_due:
                        self._next_due = None
            try:
                if finished or wanted > 0:
                    self._claim(finished, wanted)
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + lease / 3
                if now >= next_recovery:
                    if self.store.recover_expired(self.app.clock.now()):
                        self.wake()
                    next_recovery = now + lease / 2 * random.uniform(0.75, 1.25)
                failures = 0
            except StoreError as exc:
                failures += 1
                pause = min(0.05 * 2**failures, 5.0)
                log.warning("worker %s: %s; retrying in %.2fs", self.id, exc, pause)
                with self._cond:
                    self._finished[:0] = finished  # settle them in the next round
                    self._wanted = True
                    self._cond.wait(pause)

    def _claim(self, finished: list[Outcome], wanted: int) -> None:
        result = self.store.claim(
            self.id,
            self.queues,
            max(wanted, 0),
            self.app.clock.now(),
            self.app.settings.lease_seconds,
            finished,
        )
        discarded = set(result.discarded)
        for outcome in finished:
            if outcome.job_id in discarded:
                log.info(
                    "job %s: late result of attempt %d discarded", outcome.job_id, outcome.attempt
                )
            elif outcome.status == "failed":
                self._work.put(partial(after_failure, self.app, outcome.job_id, outcome.task))
            elif outcome.status == "queued" and outcome.run_at is not None:
                due = time.monotonic() + max(0.0, outcome.run_at - self.app.clock.now())
                with self._cond:
                    if self._next_due is None or due < self._next_due:
                        self._next_due = due
        with self._cond:
            if wanted > 0:
                # A full batch suggests more are due; otherwise wait to be woken.
                self._wanted = len(result.jobs) >= wanted
            for job in result.jobs:
                task = self.app.tasks.get(job.task)
                timeout = timeout_of(self.app, task) if task is not None else None
                deadline = None if timeout is None else time.monotonic() + timeout
                self._running[job.id] = _Running(job, deadline)
        for job in result.jobs:
            self._work.put(job)

    def _expire_deadlines(self, now: float) -> list[Outcome]:
        """Abandon attempts past their timeout (called with the lock held)."""
        expired: list[Outcome] = []
        for job_id, running in list(self._running.items()):
            if running.deadline is not None and now >= running.deadline:
                job = running.job
                del self._running[job_id]
                self._abandoned.add((job.id, job.attempt))
                task = self.app.tasks.get(job.task)
                timeout = (timeout_of(self.app, task) if task is not None else None) or 0.0
                expired.append(timed_out(self.app, job, timeout))
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
