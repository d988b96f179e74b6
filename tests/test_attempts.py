"""Attempts and outcomes, stepped deterministically with an injected clock and run_until_idle."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import tenacity

from reliable import (
    ConfigError,
    IdempotencyConflict,
    JobFailed,
    JobInfo,
    ManualClock,
    NonRetriable,
    PayloadTooLarge,
    Reliable,
    RetryAfter,
    current_job,
)
from reliable.errors import ReliableError
from reliable.store import ClaimedJob


def test_enqueue_then_run_returns_the_result(rel: Reliable) -> None:
    @rel.task
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.enqueue(2, b=3)
    assert handle.status() == "queued"
    assert rel.run_until_idle() == 1
    assert handle.status() == "succeeded"
    assert handle.result(timeout=1) == 5
    info = rel.get_job(handle.id)
    assert (info.task, info.attempts, info.error) == ("add", 1, None)
    assert info.started_at is not None and info.finished_at is not None


def test_plain_call_runs_inline_and_stores_nothing(rel: Reliable) -> None:
    @rel.task
    def double(x: int) -> int:
        return 2 * x

    assert double(21) == 42
    assert rel.store.count_by_status() == {}


def test_exception_is_retried_with_backoff_until_it_succeeds(
    rel: Reliable, clock: ManualClock
) -> None:
    calls: list[int] = []

    @rel.task(retries=3, backoff=tenacity.wait_fixed(10))
    def flaky() -> str:
        calls.append(current_job().attempt)
        if len(calls) < 3:
            raise ConnectionError(f"down {len(calls)}")
        return "ok"

    handle = flaky.enqueue()
    assert rel.run_until_idle() == 1
    assert handle.status() == "queued"
    assert rel.run_until_idle() == 0  # the retry is not due yet
    clock.advance(10)
    assert rel.run_until_idle() == 1
    clock.advance(10)
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=1) == "ok"
    assert calls == [1, 2, 3]
    attempts = rel.get_attempts(handle.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "retry"), (2, "retry")]
    assert attempts[0].error is not None
    assert attempts[0].error["type"] == "ConnectionError"
    assert attempts[0].error["message"] == "down 1"
    assert "raise ConnectionError" in attempts[0].error["traceback"]


def test_default_backoff_is_exponential_with_jitter(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(retries=5)
    def failing() -> None:
        raise RuntimeError("no")

    handle = failing.enqueue()
    delays = []
    for _ in range(4):
        rel.run_until_idle()
        delay = rel.get_job(handle.id).run_at.timestamp() - clock.now()
        delays.append(delay)
        clock.advance(delay + 0.01)
    # 1 s, 2 s, 4 s, 8 s, each plus up to 1 s of jitter.
    for delay, base in zip(delays, [1, 2, 4, 8], strict=True):
        assert base <= delay <= base + 1


def test_retries_spent_fails_the_job_and_on_failure_runs_once(
    rel: Reliable, clock: ManualClock
) -> None:
    failed: list[JobInfo] = []

    @rel.task(retries=2, backoff=tenacity.wait_fixed(1), on_failure=failed.append)
    def doomed() -> None:
        raise ValueError("always")

    handle = doomed.enqueue()
    for _ in range(5):
        rel.run_until_idle()
        clock.advance(1)
    info = rel.get_job(handle.id)
    assert (info.status, info.attempts) == ("failed", 3)
    assert info.error is not None and info.error["type"] == "ValueError"
    assert [job.id for job in failed] == [handle.id]
    assert failed[0].status == "failed"
    with pytest.raises(JobFailed, match="ValueError: always"):
        handle.result(timeout=1)


def test_non_retriable_fails_at_once(rel: Reliable) -> None:
    @rel.task(retries=5)
    def refuse() -> None:
        raise NonRetriable("bad input")

    handle = refuse.enqueue()
    rel.run_until_idle()
    info = rel.get_job(handle.id)
    assert (info.status, info.attempts) == ("failed", 1)
    assert info.error is not None and info.error["message"] == "bad input"


def test_exception_outside_retry_on_fails_at_once(rel: Reliable) -> None:
    @rel.task(retries=5, retry_on=ConnectionError)
    def strict() -> None:
        raise KeyError("missing")

    handle = strict.enqueue()
    rel.run_until_idle()
    assert rel.get_job(handle.id).status == "failed"


def test_retry_after_sets_the_next_attempt_time(rel: Reliable, clock: ManualClock) -> None:
    calls = []

    @rel.task(retries=3)
    def polite() -> str:
        calls.append(clock.now())
        if len(calls) == 1:
            raise RetryAfter(120)
        return "done"

    handle = polite.enqueue()
    rel.run_until_idle()
    assert rel.get_job(handle.id).run_at.timestamp() == pytest.approx(clock.now() + 120)
    clock.advance(119)
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=1) == "done"


def test_timeout_fails_the_attempt_discards_its_result_and_retries(
    rel: Reliable, clock: ManualClock
) -> None:
    calls = []

    @rel.task(timeout="30s", retries=1, backoff=tenacity.wait_fixed(5))
    def slow() -> str:
        calls.append(1)
        if len(calls) == 1:
            clock.advance(31)  # this attempt takes longer than its timeout
            return "late"
        return "in time"

    handle = slow.enqueue()
    rel.run_until_idle()
    info = rel.get_job(handle.id)
    assert info.status == "queued"
    assert info.error is not None and info.error["type"] == "reliable.execution.AttemptTimeout"
    clock.advance(5)
    rel.run_until_idle()
    assert handle.result(timeout=1) == "in time"


def test_async_task_runs_and_times_out(rel: Reliable) -> None:
    import asyncio

    @rel.task
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    @rel.task(timeout=0.05, retries=0)
    async def hang() -> None:
        await asyncio.sleep(10)

    ok, stuck = fetch.enqueue(1), hang.enqueue()
    rel.run_until_idle()
    assert ok.result(timeout=1) == 2
    info = rel.get_job(stuck.id)
    assert info.status == "failed"
    assert info.error is not None and "timeout" in info.error["message"]


def test_result_that_cannot_be_stored_fails_without_retry(rel: Reliable) -> None:
    @rel.task(retries=3)
    def odd() -> Any:
        return object()

    handle = odd.enqueue()
    rel.run_until_idle()
    info = rel.get_job(handle.id)
    assert (info.status, info.attempts) == ("failed", 1)
    assert info.error is not None and "SerializationError" in info.error["type"]


def test_current_job_outside_a_job_is_a_clear_error() -> None:
    with pytest.raises(ReliableError, match="outside a job"):
        current_job()


def test_options_are_validated_when_the_decorator_runs(rel: Reliable) -> None:
    def fn() -> None: ...

    for options, name in [
        ({"retries": -1}, "retries"),
        ({"timeout": "whenever"}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"retry_on": "ValueError"}, "retry_on"),
        ({"backoff": 5}, "backoff"),
        ({"queue": ""}, "queue"),
        ({"priority": "high"}, "priority"),
        ({"on_failure": "log"}, "on_failure"),
    ]:
        with pytest.raises(ConfigError, match=name):
            rel.task(**options)(fn)
    with pytest.raises(TypeError):
        rel.task(retry=3)(fn)


def test_task_names_are_unique(rel: Reliable) -> None:
    @rel.task(name="send")
    def first() -> None: ...

    with pytest.raises(ConfigError, match="already registered"):

        @rel.task(name="send")
        def second() -> None: ...


def test_idempotency_key_returns_the_existing_job(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def charge(order: int) -> int:
        return order

    first = charge.enqueue(1, idempotency_key="order-1")
    again = charge.enqueue(1, idempotency_key="order-1")
    assert (first.id, first.created) == (again.id, True) and again.created is False
    rel.run_until_idle()
    assert charge.enqueue(1, idempotency_key="order-1").id == first.id  # also once finished
    with pytest.raises(IdempotencyConflict):
        charge.enqueue(2, idempotency_key="order-1")
    assert rel.store.count_by_status() == {"succeeded": 1}
    clock.advance(rel.settings.idempotency_ttl + 1)
    assert charge.enqueue(1, idempotency_key="order-1").id != first.id


def test_idempotency_key_function_of_the_arguments(rel: Reliable) -> None:
    @rel.task(idempotency_key=lambda user_id, **_: f"welcome-{user_id}")
    def welcome(user_id: int, note: str = "") -> None: ...

    assert welcome.enqueue(5).id == welcome.enqueue(5).id
    assert welcome.enqueue(5).id != welcome.enqueue(6).id


def test_cancel_a_queued_job_it_never_runs(rel: Reliable) -> None:
    ran = []

    @rel.task
    def work() -> None:
        ran.append(1)

    handle = work.enqueue()
    assert rel.cancel(handle.id) is True
    assert rel.run_until_idle() == 0
    assert handle.status() == "cancelled" and ran == []
    assert rel.cancel(handle.id) is False


def test_priority_then_fifo(rel: Reliable, clock: ManualClock) -> None:
    order: list[str] = []

    @rel.task(priority=0)
    def low(name: str) -> None:
        order.append(name)

    @rel.task(priority=10)
    def high(name: str) -> None:
        order.append(name)

    for name in ("l1", "l2"):
        low.enqueue(name)
        clock.advance(0.001)
    high.enqueue("h1")
    rel.run_until_idle()
    assert order == ["h1", "l1", "l2"]


def test_arguments_over_the_payload_limit_are_refused_and_nothing_is_stored(db_url: str) -> None:
    app = Reliable(db_url, embedded_worker=False, max_payload=1000)

    @app.task
    def store_blob(blob: str) -> int:
        return len(blob)

    try:
        with pytest.raises(PayloadTooLarge, match="RELIABLE_MAX_PAYLOAD") as refused:
            store_blob.enqueue("x" * 2000)
        assert "store_blob" in str(refused.value)
        assert app.store.count_by_status() == {}
        handle = store_blob.enqueue("x" * 100)
        app.run_until_idle()
        assert handle.result(timeout=1) == 100
    finally:
        app.close()


def test_a_claim_begun_later_keeps_every_field_but_its_start() -> None:
    values: dict[str, Any] = {}
    for number, field in enumerate(dataclasses.fields(ClaimedJob)):
        values[field.name] = True if field.type == "bool" else f"v{number}"
    claimed = ClaimedJob(**values)
    assert claimed.begun(99.0) == dataclasses.replace(claimed, started_at=99.0)
