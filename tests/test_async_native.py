"""Async jobs run like async code (issue 19): each worker runs one event loop beside its
threads, ``async def`` attempts share it concurrently, loop-bound clients are made once
and closed at stop, timeouts and cancel cancel the coroutine (its slot and lease kept
until it has ended), a blocking call is reported, and steps work the same."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from reliable import Reliable, sleep, step, wait_for_event

WAIT = 30.0


def until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


class Recorder(logging.Handler):
    """Collects the records of a logger during a test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


def script_output(script: str, db_url: str) -> str:
    """Run ``script`` in a process of its own (argument: the database URL); its output."""
    done = subprocess.run(
        [sys.executable, "-c", script, db_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def live(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False)
    yield app
    app.close()


@pytest.fixture
def asyncio_log() -> Iterator[Recorder]:
    """What asyncio logs ("Task was destroyed but it is pending", unretrieved errors)."""
    recorder = Recorder()
    logger = logging.getLogger("asyncio")
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)
    assert recorder.messages(logging.ERROR) == []


class Events:
    """Numbered events recorded by jobs, in the order they happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[str, object]] = []

    def add(self, what: str, who: object) -> None:
        with self._lock:
            self.seen.append((what, who))

    def index(self, what: str, who: object) -> int:
        with self._lock:
            return self.seen.index((what, who))

    def count(self, what: str) -> int:
        with self._lock:
            return sum(1 for kind, _ in self.seen if kind == what)


def test_forty_async_sleeps_on_four_threads_run_at_once(live: Reliable) -> None:
    events = Events()

    @live.task
    async def nap(n: int) -> int:
        events.add("start", n)
        await asyncio.sleep(1)
        events.add("end", n)
        return n

    handles = [nap.enqueue(n) for n in range(40)]
    live.start_worker(threads=4)
    try:
        assert [h.result(timeout=WAIT) for h in handles] == list(range(40))
    finally:
        live.stop_worker(timeout=5)
    first_end = next(i for i, (kind, _) in enumerate(events.seen) if kind == "end")
    overlapping = sum(1 for kind, _ in events.seen[:first_end] if kind == "start")
    # On threads, at most 4 could have begun before one ended; on the loop, all of them.
    assert overlapping > 4 * 2, events.seen[: first_end + 1]


def test_a_loop_resource_is_made_once_shared_and_closed_at_stop(
    live: Reliable, asyncio_log: Recorder
) -> None:
    made: list[Client] = []

    class Client:
        def __init__(self) -> None:
            self.loop = asyncio.get_running_loop()  # bound to the loop that made it
            self.closed = False
            made.append(self)

        async def aclose(self) -> None:
            await asyncio.sleep(0)
            self.closed = True

    client = live.loop_resource(Client)

    @live.task
    async def use(n: int) -> int:
        mine = client()
        assert mine.loop is asyncio.get_running_loop()
        await asyncio.sleep(0.05)
        return id(mine)

    handles = [use.enqueue(n) for n in range(20)]
    live.start_worker(threads=2)
    try:
        ids = {h.result(timeout=WAIT) for h in handles}
    finally:
        live.stop_worker(timeout=5)
    assert len(made) == 1 and ids == {id(made[0])}
    assert made[0].closed, "the worker closes its loop resources when it stops"
    assert made[0].loop.is_closed(), "and then its loop"


def test_a_timeout_cancels_the_coroutine_and_the_slot_waits_for_its_end(
    live: Reliable,
) -> None:
    events = Events()

    @live.task(concurrency=1, timeout=0.5, retries=0)
    async def capped(n: int) -> None:
        events.add("start", n)
        try:
            await asyncio.sleep(60 if n == 0 else 0)
        except asyncio.CancelledError:
            events.add("cancelled", n)
            await asyncio.sleep(1.0)  # cleanup after the cancel: the cap still holds
            events.add("ended", n)
            raise

    first = capped.enqueue(0)
    live.start_worker(threads=4)
    try:
        until(lambda: events.count("start") >= 1, "the first attempt began")
        second = capped.enqueue(1)
        assert second.result(timeout=WAIT) is None
        assert first.status() == "failed"
        assert "AttemptTimeout" in str(live.get_job(first.id).error)
    finally:
        live.stop_worker(timeout=5)
    assert events.index("cancelled", 0) < events.index("ended", 0) < events.index("start", 1)


def test_cancel_of_a_running_async_job_cancels_its_coroutine_only(live: Reliable) -> None:
    inside, saw = threading.Event(), threading.Event()

    @live.task
    async def poll() -> None:
        inside.set()
        try:
            while True:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            saw.set()
            raise

    @live.task
    async def sibling() -> str:
        await asyncio.sleep(0.3)
        return "done"

    live.start_worker(threads=1)
    try:
        job = poll.enqueue()
        other = sibling.enqueue()
        assert inside.wait(WAIT)
        assert live.cancel(job.id)
        assert saw.wait(WAIT), "the coroutine sees CancelledError"
        until(lambda: job.status() == "cancelled", "the job is cancelled")
        assert other.result(timeout=WAIT) == "done"
    finally:
        live.stop_worker(timeout=5)


def test_a_blocking_call_in_an_async_job_is_reported(live: Reliable) -> None:
    recorder = Recorder()
    logger = logging.getLogger("reliable.worker")
    logger.addHandler(recorder)

    @live.task
    async def blocks() -> None:
        time.sleep(2.5)  # blocks the loop: every other async job waits

    try:
        live.start_worker(threads=1)
        handle = blocks.enqueue()
        assert handle.result(timeout=WAIT) is None
        live.stop_worker(timeout=5)
    finally:
        logger.removeHandler(recorder)
    reports = [m for m in recorder.messages() if "event loop has been blocked" in m]
    assert reports, recorder.messages()
    assert f"job {handle.id} (" in reports[0] and "blocks" in reports[0]
    assert "time.sleep(2.5)" in reports[0], "the report shows the blocking line"


def test_sync_and_async_jobs_share_one_worker(live: Reliable) -> None:
    release = threading.Event()
    where: dict[str, set[str]] = {"sync": set(), "async": set()}

    @live.task
    def hold(n: int) -> int:
        where["sync"].add(threading.current_thread().name)
        assert release.wait(WAIT)
        return n

    @live.task
    async def free(n: int) -> int:
        where["async"].add(threading.current_thread().name)
        await asyncio.sleep(0.01)
        return n

    held = [hold.enqueue(n) for n in range(2)]
    live.start_worker(threads=2)
    try:
        until(lambda: len(where["sync"]) == 2, "both threads hold a sync job")
        # Every thread is busy, yet async jobs run: they need no thread.
        assert [free.enqueue(n).result(timeout=WAIT) for n in range(5)] == list(range(5))
        release.set()
        assert [h.result(timeout=WAIT) for h in held] == [0, 1]
    finally:
        release.set()
        live.stop_worker(timeout=5)
    assert len(where["async"]) == 1 and where["async"].isdisjoint(where["sync"])


def test_a_cap_holds_for_async_jobs(live: Reliable) -> None:
    lock = threading.Lock()
    now = [0]
    most = [0]

    @live.task(concurrency=2)
    async def capped(n: int) -> int:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        await asyncio.sleep(0.05)
        with lock:
            now[0] -= 1
        return n

    handles = [capped.enqueue(n) for n in range(12)]
    live.start_worker(threads=1)
    try:
        assert [h.result(timeout=WAIT) for h in handles] == list(range(12))
    finally:
        live.stop_worker(timeout=5)
    assert most[0] == 2


def test_steps_sleep_and_events_work_from_async_jobs(live: Reliable) -> None:
    calls = {"fetch": 0, "total": 0}

    async def fetch(order_id: int) -> dict[str, int]:
        calls["fetch"] += 1
        await asyncio.sleep(0)
        return {"order": order_id, "amount": 5}

    def total(amount: int) -> int:
        calls["total"] += 1
        return amount * 2

    @live.task
    async def order(order_id: int) -> dict[str, object]:
        fetched = await step("fetch", fetch, order_id)
        doubled = step("total", total, fetched["amount"])
        sleep("cool-off", 0.2)
        paid = wait_for_event("paid", "payment", match={"order": order_id})
        return {"doubled": doubled, "paid": paid}

    live.start_worker(threads=1)
    try:
        handle = order.enqueue(7)
        until(lambda: live.get_job(handle.id).status == "sleeping", "the job sleeps")
        until(
            lambda: any(s.name == "paid" for s in live.get_steps(handle.id)),
            "the job waits for its event",
        )
        live.send_event("payment", {"order": 7, "ok": True})
        assert handle.result(timeout=WAIT) == {"doubled": 10, "paid": {"order": 7, "ok": True}}
    finally:
        live.stop_worker(timeout=5)
    assert calls == {"fetch": 1, "total": 1}, "a resumed job does not run its steps again"


def test_stopping_a_worker_with_async_jobs_running_leaves_nothing_behind(
    live: Reliable, asyncio_log: Recorder
) -> None:
    started = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    @live.task
    async def long() -> None:
        loops.append(asyncio.get_running_loop())
        started.set()
        await asyncio.sleep(60)

    handle = long.enqueue()
    worker = live.start_worker(threads=1)
    assert started.wait(WAIT)
    live.stop_worker(timeout=0.2)  # past the grace: the coroutine is cancelled
    until(lambda: not worker.running, "the worker ended")
    assert loops[0].is_closed()
    job = live.get_job(handle.id)
    assert job.status == "queued" and job.attempts == 0, "given back, uncounted"


EXIT_SCRIPT = """
import asyncio, os, sys, time
from reliable import Reliable

rel = Reliable(sys.argv[1], embedded_worker=False)

@rel.task
async def long() -> None:
    await asyncio.sleep(60)

handles = [long.enqueue() for _ in range(20)]
rel.start_worker(threads=1)
while any(h.status() != "running" for h in handles):
    time.sleep(0.01)
print(" ".join(h.id for h in handles), flush=True)
rel.stop_worker(timeout=0.1, exiting=True)
os._exit(0)  # as a server ends on SIGTERM: no atexit, no other thread goes on
"""


def test_a_process_ending_gives_back_the_jobs_whose_coroutines_just_ended(
    live: Reliable,
) -> None:
    # Past the grace period the coroutines are cancelled and end at once, given back;
    # stop(exiting=True) returns only once that is in the database, since the process
    # ends right after, before the worker's next round would have settled it.
    live.store  # noqa: B018 - the schema exists before the process starts
    ids = script_output(EXIT_SCRIPT, live.settings.database_url).split()
    jobs = [live.get_job(job_id) for job_id in ids]
    assert [(j.status, j.attempts) for j in jobs] == [("queued", 0)] * 20


def test_leases_are_renewed_while_an_async_job_awaits(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False, lease_seconds=1)
    runs: list[int] = []

    @app.task
    async def long(n: int) -> int:
        runs.append(n)
        await asyncio.sleep(3)  # three leases long: only renewals keep the job here
        return n

    try:
        app.start_worker(threads=1)
        handle = long.enqueue(1)
        assert handle.result(timeout=WAIT) == 1
        app.stop_worker(timeout=5)
        assert runs == [1], "the job was never taken over while it awaited"
        assert app.get_job(handle.id).attempts == 1
    finally:
        app.close()


def test_async_concurrency_bounds_the_attempts_on_the_loop(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False, async_concurrency=5)
    lock = threading.Lock()
    now = [0]
    most = [0]

    @app.task
    async def nap(n: int) -> int:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        await asyncio.sleep(0.1)
        with lock:
            now[0] -= 1
        return n

    try:
        handles = [nap.enqueue(n) for n in range(30)]
        app.start_worker(threads=1)
        assert [h.result(timeout=WAIT) for h in handles] == list(range(30))
        app.stop_worker(timeout=5)
    finally:
        app.close()
    assert 1 < most[0] <= 5


ROUTE_SCRIPT = """
import asyncio, json, sys, threading, warnings
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from reliable import Reliable
from reliable.integrations.starlette import ReliableMiddleware
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

rel = Reliable(sys.argv[1], embedded_worker=False)
events = []

async def report(request: Request) -> JSONResponse:
    events.append(("start", threading.current_thread().name))
    await asyncio.sleep(1)
    events.append(("end", threading.current_thread().name))
    return JSONResponse({"ok": True}, status_code=201)

app = Starlette(
    routes=[Route("/report", rel.offload(report), methods=["POST"])],
    middleware=[Middleware(ReliableMiddleware, reliable=rel)],
)
ids = [TestClient(app).post("/report").json()["id"] for _ in range(12)]
rel.start_worker(threads=2)
results = [rel.job(job_id).result(timeout=60) for job_id in ids]
rel.stop_worker(timeout=5)
rel.close()
print(json.dumps({"events": events, "statuses": [r["status_code"] for r in results]}))
"""


def test_offloaded_async_starlette_routes_run_on_the_loop(db_url: str) -> None:
    # A process of its own: one that imports only the ASGI integrations, as a Starlette
    # or FastAPI deployment does (here the Flask one is imported by other tests).
    report = json.loads(script_output(ROUTE_SCRIPT, db_url).splitlines()[-1])
    assert report["statuses"] == [201] * 12
    events = report["events"]
    first_end = next(i for i, (kind, _) in enumerate(events) if kind == "end")
    assert sum(1 for kind, _ in events[:first_end] if kind == "start") > 2 * 2
    assert {name for _, name in events} == {events[0][1]}
    assert events[0][1].startswith("reliable-loop")


SYNC_ROUTE_SCRIPT = """
import json, sys, threading, time, warnings
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from reliable import Reliable
from reliable.integrations.starlette import ReliableMiddleware
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

rel = Reliable(sys.argv[1], embedded_worker=False)
events = []
lock = threading.Lock()

def note(what, n):
    with lock:
        events.append([what, n])

def work(request: Request) -> JSONResponse:  # a plain def: Starlette runs it in a thread
    n = int(request.query_params["n"])
    note("start", n)
    time.sleep(1.5 if n == 0 else 0)  # the first outlives its timeout in its thread
    note("end", n)
    return JSONResponse({"n": n})

app = Starlette(
    routes=[Route("/work", rel.offload(work, concurrency=1, timeout=0.3, retries=0),
                  methods=["POST"])],
    middleware=[Middleware(ReliableMiddleware, reliable=rel)],
)
client = TestClient(app)
first = client.post("/work?n=0").json()["id"]
rel.start_worker(threads=2)
while not events:
    time.sleep(0.01)
second = client.post("/work?n=1").json()["id"]
rel.job(second).result(timeout=60)
rel.stop_worker(timeout=5)
print(json.dumps({"events": events, "first": rel.get_job(first).status,
                  "error": str(rel.get_job(first).error)}))
rel.close()
"""


def test_a_timed_out_plain_starlette_endpoint_keeps_its_slot_until_it_returns(
    db_url: str,
) -> None:
    # The endpoint runs in a thread under the loop's coroutine: the coroutine is
    # cancelled at the timeout, but the attempt ends, and frees its slot, only when the
    # function has returned; the cap of 1 is never exceeded.
    report = json.loads(script_output(SYNC_ROUTE_SCRIPT, db_url).splitlines()[-1])
    assert report["events"] == [["start", 0], ["end", 0], ["start", 1], ["end", 1]]
    assert report["first"] == "failed" and "AttemptTimeout" in report["error"]
