"""The event loop a worker runs async attempts on, beside its threads.

One long-lived loop in a thread of its own runs the attempts of ``async def`` tasks
(and of offloaded async routes) concurrently, up to ``RELIABLE_ASYNC_CONCURRENCY``;
the attempts of plain functions stay on the worker's threads. Clients bound to a loop
(an ``httpx.AsyncClient``, an async database pool) are made once per loop and shared by
every async job on it: see ``LoopResource``. When the worker stops, they are closed,
then the loop.

A watchdog notices when something blocks the loop (a synchronous call inside an async
job) and logs which job, and the stack of what blocks it, so the other attempts are not
left frozen in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .context import AttemptControl
from .handover import Running
from .registry import Registry
from .store import ClaimedJob, ClaimResult, Outcome
from .tasks import Task
from .web.routes import ADAPTERS, RouteTask

log = logging.getLogger("reliable.worker")

T = TypeVar("T")

# How long the loop may go without turning before the watchdog reports it blocked.
BLOCKED_SECONDS = 1.0
_TICK_SECONDS = 0.05
# Async attempts shorter than this on average are claimed ahead (see ``Lanes``).
SHORT_JOB_SECONDS = 0.05
# The dispatcher is told of every attempt that ends on a thread, but only of the first
# async one since the last settle, of every NOTIFY_EVERY-th after it and of the last
# one running: each wake-up costs it a look at every attempt it holds, and a hundred
# of them end together on the loop. The settle delay bounds the wait of the others.
NOTIFY_EVERY = 32


def on_loop(task: Task[Any, Any] | None) -> bool:
    """Whether the attempts of ``task`` run on the worker's event loop.

    ``async def`` tasks do; an offloaded route does when every framework integration
    imported in this process runs its handlers as coroutines (Starlette, FastAPI). With
    Flask imported too, routes run on threads (an async route's handler is then still
    awaited on the worker's loop, its thread waiting for it)."""
    if task is None:
        return False
    if isinstance(task, RouteTask):
        adapters = list(ADAPTERS.values())
        return bool(adapters) and all(inspect.iscoroutinefunction(a.run) for a in adapters)
    return task.is_async


@dataclass(frozen=True)
class Claimed:
    """What ``Lanes.claim`` got: the jobs of both lanes, the result of the claim that
    settled, whether a lane got all it asked for, whether to claim again at once."""

    jobs: list[ClaimedJob]
    first: ClaimResult
    full: bool
    again: bool


@dataclass
class Lane:
    """When one lane is worth a claim: after a claim that found fewer jobs than it asked
    for, only once the worker was woken since (an enqueue, a notification), a poll
    interval has passed, a retry or a sleep settled from it is due, or slots were
    released (they may unpark jobs). So a worker draining one kind of job does not pay
    a transaction per round for the other kind."""

    short: bool = False
    wakes: int = -1  # the worker's wake count at the last claim
    at: float = 0.0  # time.monotonic() of the last claim
    due: float | None = None  # clock time a retry or a sleep settled here is due

    def worth(self, wakes: int, now: float, instant: float, poll: float) -> bool:
        due = self.due is not None and instant >= self.due
        return not self.short or wakes != self.wakes or now >= self.at + poll or due

    def claimed(self, short: bool, wakes: int, now: float, instant: float) -> None:
        self.short, self.wakes, self.at = short, wakes, now
        if self.due is not None and self.due <= instant:
            self.due = None

    def settled(self, outcome: Outcome, lanes: Sequence[Lane]) -> None:
        if outcome.limits:
            for lane in lanes:  # its slots are released: jobs of any lane may be unparked
                lane.short = False
        if outcome.status in ("queued", "sleeping") and outcome.run_at is not None:
            self.due = outcome.run_at if self.due is None else min(self.due, outcome.run_at)


class Lanes:
    """A worker's two lanes: ``threads`` threads for plain functions, and its loop for up
    to ``limit`` async attempts at once. Each is claimed for apart, its own tasks only,
    so that a thousand async jobs are not taken a thread's worth at a time."""

    def __init__(
        self,
        registry: Registry,
        threads: int,
        begin: Callable[[ClaimedJob], tuple[ClaimedJob, AttemptControl, float] | None],
        attempt: Callable[[ClaimedJob, AttemptControl], Awaitable[Outcome]],
        end: Callable[..., bool],
    ) -> None:
        self.registry = registry
        self.threads = threads
        self.limit = registry.runtime.settings.async_concurrency
        # The worker's ``_begin`` and ``_end`` of an attempt, and the attempt itself.
        self._begin, self._attempt, self._end = begin, attempt, end
        self.runner: AsyncRunner | None = None
        # The task names of each lane (aliases included), as of the last claim.
        self.thread_tasks: frozenset[str] = frozenset()
        self.loop_tasks: frozenset[str] = frozenset()
        self.lanes = (Lane(), Lane())  # threads, loop
        self._places = asyncio.Semaphore(self.limit)
        self._lock = threading.Lock()
        self._handed: list[ClaimedJob] = []  # not yet on the loop
        self._tasks: set[asyncio.Task[None]] = set()
        self.average = 1.0  # seconds per async attempt, a moving average

    def split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Task ``names`` in two: those run on threads, those on the loop."""
        threads: list[str] = []
        loop: list[str] = []
        for name in names:
            (loop if on_loop(self.registry.tasks.get(name)) else threads).append(name)
        self.thread_tasks, self.loop_tasks = frozenset(threads), frozenset(loop)
        return threads, loop

    def on_loop(self, task: str) -> bool:
        return task in self.loop_tasks

    def start(self, name: str) -> None:
        self.runner = AsyncRunner(name).start()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self.runner.loop if self.runner is not None else None

    def hand(self, put: Callable[[ClaimedJob], None], job: ClaimedJob) -> None:
        """Start ``job`` on the loop if it belongs there, else ``put`` it to the threads.

        The jobs of one claim reach the loop in one call: a wake-up of the loop per job
        would cost the handing thread a wait for the busy loop's thread each time."""
        if self.runner is None or job.task not in self.loop_tasks:
            put(job)
            return
        with self._lock:
            self._handed.append(job)
            first = len(self._handed) == 1
        if first:
            self.runner.call_soon(self._start_handed)

    def _start_handed(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            jobs, self._handed = self._handed, []
        for job in jobs:
            task = loop.create_task(self.run(job))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

    async def run(self, item: ClaimedJob) -> None:
        """An attempt on the loop, begun and ended by the worker as on a thread; jobs
        claimed ahead wait here for one of the ``limit`` places."""
        async with self._places:
            begun = self._begin(item)
            if begun is None:
                return  # given back, or cancelled, before it started
            job, control, began = begun
            outcome = await self._attempt(job, control)
            self.average += 0.1 * (time.monotonic() - began - self.average)
            self._end(job, outcome, began, thread=False)

    def claim(
        self,
        worker_id: str,
        queues: list[str],
        tasks: list[str],
        wanted: tuple[int, int],
        finished: Sequence[Outcome],
        riding: dict[str, Any],
        wakes: int,
    ) -> Claimed:
        """Settle ``finished`` and claim up to ``wanted`` jobs (for threads, for the
        loop), one transaction per lane with room and worth a look (see ``Lane``);
        ``riding``: the arguments of ``Store.claim`` for riders, given to the threads'
        lane; ``wakes``: the worker's count of wake-ups."""
        runtime = self.registry.runtime
        threads, loop = self.split(tasks)
        now, instant = time.monotonic(), runtime.clock.now()
        for outcome in finished:
            self.lanes[outcome.task in self.loop_tasks].settled(outcome, self.lanes)
        poll = runtime.settings.poll_interval
        lanes: list[tuple[list[str], int, Lane | None]] = [
            (names, count, lane)
            for names, count, lane in zip((threads, loop), wanted, self.lanes, strict=True)
            if names and count > 0 and lane.worth(wakes, now, instant, poll)
        ]
        results: list[ClaimResult] = []
        for names, limit, lane in lanes or [(tasks, 0, None)]:
            result = runtime.store.claim(
                worker_id,
                queues,
                limit,
                runtime.clock.now(),
                runtime.settings.lease_seconds,
                finished if not results else (),
                tasks=names,
                limited=self.registry.limited_at_claim(),
                **(riding if names is threads else {}),
            )
            results.append(result)
            if lane is not None:
                lane.claimed(len(result.jobs) < limit and not result.again, wakes, now, instant)
        return Claimed(
            [job for each in results for job in each.jobs],
            results[0],
            any(len(r.jobs) >= limit for r, (_, limit, _) in zip(results, lanes, strict=False)),
            any(r.again for r in results),
        )

    def counts(self, running: Iterable[Running]) -> tuple[int, int, int, int]:
        """Attempts held for threads, how many of them have not begun, and the same two
        for the loop."""
        threads = waiting = loop = ahead = 0
        for each in running:
            if each.job.task in self.loop_tasks:
                loop += 1
                ahead += each.started is None
            else:
                threads += 1
                waiting += each.started is None
        return threads, waiting, loop, ahead

    def _capacity(self) -> int:
        """How many async attempts to hold: ``limit``, twice that for short ones (claimed
        ahead, so that a claim overlaps the attempts of the one before)."""
        return self.limit * 2 if self.average < SHORT_JOB_SECONDS else self.limit

    def hungry(self, running: Iterable[Running]) -> bool:
        """Whether to settle and claim now: fewer jobs wait for threads than there are
        threads, or the loop has room while its last claim found jobs (or it still
        runs some): each round settles what ended meanwhile, so rounds batch by
        themselves.

        With short jobs a worker holds several per thread; claiming again as soon as
        one has finished would cost a transaction for every few jobs."""
        _, waiting, loop, ahead = self.counts(running)
        fed = loop or not self.lanes[1].short
        if self.loop_tasks and fed and loop < self._capacity() and ahead <= self.limit // 2:
            return True
        return waiting < self.threads and (bool(self.thread_tasks) or not self.loop_tasks)

    def room(self, running: Iterable[Running], capacity: int) -> tuple[int, int]:
        """How many more attempts to claim: for threads (``capacity`` in all), for the
        loop (when it has tasks, or before the tasks are known)."""
        threads, _, loop, _ = self.counts(running)
        known = self.loop_tasks or not self.thread_tasks
        return capacity - threads, self._capacity() - loop if known else 0


class LoopResource(Generic[T]):
    """An object bound to an event loop (an ``httpx.AsyncClient``, a connection pool),
    made once per loop by ``factory()`` on first use and shared by the async jobs on it.

    Call it inside an async job: ``client = http()`` returns this loop's instance. When
    the worker stops, its loop's instance is closed (``aclose()`` or ``close()``, awaited
    if it returns an awaitable) before the loop is. ``Reliable.loop_resource(factory)``
    makes one."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self.factory = factory
        self._made: dict[int, T] = {}
        self._lock = threading.Lock()

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        with self._lock:
            if id(loop) in self._made:
                return self._made[id(loop)]
        made = self.factory()  # outside the lock: a factory may take a while
        with self._lock:
            if id(loop) in self._made:  # two jobs raced; the first one's stays
                extra, made = made, self._made[id(loop)]
            else:
                self._made[id(loop)] = made
                extra = None
                with _registry_lock:
                    _LOOP_RESOURCES.setdefault(id(loop), []).append(self)
        if extra is not None:
            _close_later(extra)
        return made

    async def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            found = self._made.pop(id(loop), None)
        if found is not None:
            await _close(found)


_LOOP_RESOURCES: dict[int, list[LoopResource[Any]]] = {}
_registry_lock = threading.Lock()


async def _close(found: object) -> None:
    closer = getattr(found, "aclose", None) or getattr(found, "close", None)
    if closer is None:
        return
    try:
        done = closer()
        if inspect.isawaitable(done):
            await done
    except Exception:
        log.exception("closing %r at the end of the worker's event loop failed", found)


def _close_later(found: object) -> None:
    asyncio.get_running_loop().create_task(_close(found))


async def close_loop_resources() -> None:
    """Close the ``LoopResource`` instances made on the running loop, newest first."""
    loop = asyncio.get_running_loop()
    with _registry_lock:
        resources = _LOOP_RESOURCES.pop(id(loop), [])
    for resource in reversed(resources):
        await resource._close(loop)


class AsyncRunner:
    """A thread running one event loop, and its watchdog.

    ``call_soon`` runs a callback on the loop. The worker claims no more async jobs than
    its ``RELIABLE_ASYNC_CONCURRENCY``; ``stop`` closes the loop once what runs on it has
    ended: loop resources first, then async generators, then the loop."""

    def __init__(self, name: str = "reliable-loop") -> None:
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the runner was not started"
        return self._loop

    def start(self) -> AsyncRunner:
        self._thread.start()
        self._ready.wait()
        self._watchdog.start()
        return self

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(callback)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the loop (waiting up to ``timeout`` for it): what still runs on it is
        cancelled and awaited, loop resources are closed, then the loop."""
        loop = self._loop
        if loop is None or self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(RuntimeError):  # closed already
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._watchdog.join(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._tick)
        self._ready.set()
        try:
            loop.run_forever()
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(close_loop_resources())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        if not self._stopped.is_set():
            self.loop.call_later(_TICK_SECONDS, self._tick)

    def _watch(self) -> None:
        reported = 0.0
        while not self._stopped.wait(_TICK_SECONDS):
            last = self._last_tick
            blocked = time.monotonic() - last
            if blocked < BLOCKED_SECONDS or last == reported:
                continue
            reported = last
            self._report(blocked)

    def _report(self, blocked: float) -> None:
        """The loop has not turned for ``blocked`` seconds: name the job running on it
        and where it is."""
        task = asyncio.current_task(self.loop)
        who = task.get_name() if task is not None else "code outside any job"
        frame = sys._current_frames().get(self._thread.ident or 0)
        where = "".join(traceback.format_stack(frame, limit=12)) if frame else "?\n"
        log.warning(
            "the worker's event loop has been blocked for %.1fs by %s: every other async "
            "job waits meanwhile. A blocking call inside an async job? Await an async "
            "version, or run it with asyncio.to_thread. It is here:\n%s",
            blocked,
            who,
            where.rstrip("\n"),
        )
