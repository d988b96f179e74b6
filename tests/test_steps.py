"""Durable steps, sleeps and events, stepped with an injected clock and run_until_idle."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
import tenacity
from sqlalchemy import event

from reliable import (
    Concurrency,
    ManualClock,
    Reliable,
    SerializationError,
    current_job,
    sleep,
    step,
    wait_for_event,
)
from reliable.errors import ReliableError
from reliable.execution import run_attempt
from reliable.steps import StepNameReused


@dataclass
class Receipt:
    number: int
    total: Decimal


def test_completed_steps_are_not_repeated_when_a_later_step_fails(
    rel: Reliable, clock: ManualClock
) -> None:
    calls: Counter[str] = Counter()

    def effect(name: str, value: Any) -> Any:
        calls[name] += 1
        if name == "charge" and calls[name] < 3:
            raise ConnectionError("payment provider down")
        return value

    @rel.task(retries=5, backoff=tenacity.wait_fixed(1))
    def checkout(order: int) -> dict[str, Any]:
        profile = step("fetch-profile", effect, "fetch-profile", {"email": "ada@example.com"})
        total = step("price", effect, "price", Decimal("12.50"))
        receipt = step("charge", effect, "charge", Receipt(order, total))
        return {"to": profile["email"], "receipt": receipt.number, "total": str(receipt.total)}

    handle = checkout.enqueue(7)
    for _ in range(4):
        rel.run_until_idle()
        clock.advance(1)
    assert handle.result(timeout=1) == {"to": "ada@example.com", "receipt": 7, "total": "12.50"}
    assert calls == {"fetch-profile": 1, "price": 1, "charge": 3}
    timeline = rel.get_steps(handle.id)
    assert [(s.name, s.status, s.attempts) for s in timeline] == [
        ("fetch-profile", "succeeded", 1),
        ("price", "succeeded", 1),
        ("charge", "succeeded", 3),
    ]
    assert timeline[2].result == Receipt(7, Decimal("12.50"))


def test_step_retries_inside_the_step(rel: Reliable) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow")
        return "ok"

    @rel.task(retries=0)
    def job() -> str:
        return step("call", flaky, retries=2)

    handle = job.enqueue()
    rel.run_until_idle()
    assert handle.result(timeout=1) == "ok" and len(calls) == 3


def test_a_step_name_is_unique_within_a_job(rel: Reliable) -> None:
    @rel.task(retries=0)
    def twice() -> None:
        step("same", lambda: 1)
        step("same", lambda: 2)

    handle = twice.enqueue()
    rel.run_until_idle()
    info = rel.get_job(handle.id)
    assert info.status == "failed"
    assert info.error is not None and "'same'" in info.error["message"]
    assert StepNameReused.__name__ in info.error["type"]


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 28, 9, 30, tzinfo=timezone.utc),
        date(2026, 1, 1),
        uuid.UUID(int=7),
        Decimal("0.10"),
        b"\x00raw",
        Receipt(1, Decimal("2")),
        {"nested": [1, "two", None]},
    ],
)
def test_every_supported_type_round_trips_through_a_step(rel: Reliable, value: object) -> None:
    seen: list[object] = []

    @rel.task(retries=1, backoff=tenacity.wait_fixed(0))
    def job() -> None:
        stored = step("make", lambda: value)
        seen.append(stored)
        if len(seen) == 1:
            raise RuntimeError("fail after the step, so the next attempt replays it")

    job.enqueue()
    rel.run_until_idle()
    assert seen == [value, value]
    assert type(seen[1]) is type(value)


def test_an_unsupported_step_value_fails_naming_its_type(rel: Reliable) -> None:
    @rel.task(retries=3)
    def job() -> None:
        step("lock", lambda: asyncio.Lock())

    handle = job.enqueue()
    rel.run_until_idle()
    info = rel.get_job(handle.id)
    assert (info.status, info.attempts) == ("failed", 1)
    assert info.error is not None and "Lock" in info.error["message"]
    assert SerializationError.__name__ in info.error["type"]


def test_sleep_frees_the_slot_and_resumes_after_the_delay(
    rel: Reliable, clock: ManualClock
) -> None:
    order: list[str] = []

    @rel.task(concurrency=1)
    def job(name: str) -> str:
        step("before", order.append, f"{name}:before")
        if name == "a":
            sleep("cool-off", "1h")
        step("after", order.append, f"{name}:after")
        return name

    a, b = job.enqueue("a"), job.enqueue("b")
    rel.run_until_idle()
    assert a.status() == "sleeping"
    assert b.result(timeout=1) == "b"  # b ran while a slept, despite concurrency=1
    assert order == ["a:before", "b:before", "b:after"]
    clock.advance(3599)
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 1
    assert a.result(timeout=1) == "a"
    assert order == ["a:before", "b:before", "b:after", "a:after"]
    assert rel.get_job(a.id).attempts == 1  # a sleep is not an attempt
    assert [s.name for s in rel.get_steps(a.id)] == ["before", "cool-off", "after"]


def test_wait_for_event_matches_by_data(rel: Reliable) -> None:
    @rel.task
    def fulfil(order_id: int) -> Any:
        paid = wait_for_event("paid", "payment.received", match={"order_id": order_id})
        return {"order": order_id, "amount": paid["amount"]}

    first, second = fulfil.enqueue(1), fulfil.enqueue(2)
    rel.run_until_idle()
    assert first.status() == second.status() == "sleeping"
    assert rel.send_event("payment.received", {"order_id": 3, "amount": 5}) == []
    assert rel.send_event("payment.received", {"order_id": 2, "amount": 20}) == [second.id]
    rel.run_until_idle()
    assert second.result(timeout=1) == {"order": 2, "amount": 20}
    assert first.status() == "sleeping"


def test_an_event_wakes_every_matching_waiter(rel: Reliable) -> None:
    @rel.task
    def notify(user: str) -> Any:
        return wait_for_event("deploy", "deployed")

    handles = [notify.enqueue(user) for user in ("a", "b", "c")]
    rel.run_until_idle()
    assert sorted(rel.send_event("deployed", {"version": 3})) == sorted(h.id for h in handles)
    rel.run_until_idle()
    assert [h.result(timeout=1) for h in handles] == [{"version": 3}] * 3


def test_wait_for_event_times_out_with_none(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def approve(request_id: int) -> str:
        decision = wait_for_event("approval", "approved", timeout="2d")
        return "approved" if decision else "expired"

    handle = approve.enqueue(1)
    rel.run_until_idle()
    clock.advance(2 * 86400)
    rel.run_until_idle()
    assert handle.result(timeout=1) == "expired"
    assert rel.send_event("approved", {"request_id": 1}) == []


def test_async_steps(rel: Reliable) -> None:
    calls = []

    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        return x * 2

    @rel.task(retries=1, backoff=tenacity.wait_fixed(0))
    async def job() -> int:
        doubled = await step("fetch", fetch, 21)
        if len(calls) == 1 and current_job().attempt == 1:
            raise RuntimeError("once")
        return doubled

    handle = job.enqueue()
    rel.run_until_idle()
    assert handle.result(timeout=1) == 42 and calls == [21]


def test_step_outside_a_job_is_a_clear_error() -> None:
    with pytest.raises(ReliableError, match="outside a job"):
        step("x", lambda: 1)


def test_a_hundred_steps_cost_a_write_each_not_a_reload(rel: Reliable) -> None:
    @rel.task
    def many() -> int:
        return sum(step(f"s{i}", lambda i=i: i) for i in range(100))

    statements: list[str] = []

    def count(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if "reliable_steps" in sql:
            statements.append(sql.split()[0].upper())

    handle = many.enqueue()
    event.listen(rel.store.engine, "before_cursor_execute", count)
    try:
        rel.run_until_idle()
    finally:
        event.remove(rel.store.engine, "before_cursor_execute", count)
    assert handle.result(timeout=1) == sum(range(100))
    assert Counter(statements) == {"INSERT": 100, "SELECT": 1}


def test_steps_hold_under_a_per_key_cap(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(concurrency=Concurrency(1, key="arg:account"))
    def close(account: str) -> str:
        step("freeze", lambda: None)
        sleep("grace", 10)
        return step("close", lambda: f"closed {account}")

    handle = close.enqueue("acct-1")
    rel.run_until_idle()
    clock.advance(10)
    rel.run_until_idle()
    assert handle.result(timeout=1) == "closed acct-1"


def test_an_attempt_that_lost_its_job_stops_before_its_next_step(
    rel: Reliable, clock: ManualClock
) -> None:
    ran: list[str] = []

    @rel.task
    def two_steps() -> None:
        step("one", ran.append, "one")
        step("two", ran.append, "two")

    handle = two_steps.enqueue()
    lease = rel.settings.lease_seconds
    stale = rel.store.claim("worker-a", ["default"], 1, clock.now(), lease).jobs[0]
    clock.advance(lease + 1)  # worker-a froze; its job went back to the queue
    assert rel.store.recover_expired(clock.now()) == [handle.id]
    outcome = run_attempt(rel, stale)  # worker-a wakes up and goes on
    assert ran == ["one"]  # its first step ran, could not be recorded, and it stopped
    assert rel.get_steps(handle.id) == []
    assert rel.store.settle("worker-a", [outcome]) == [handle.id]  # discarded
    assert rel.run_until_idle() == 1
    assert ran == ["one", "one", "two"]
    assert [s.name for s in rel.get_steps(handle.id)] == ["one", "two"]


def test_a_cancelled_attempt_keeps_its_current_step_and_runs_no_other(
    rel: Reliable, clock: ManualClock
) -> None:
    ran: list[str] = []

    @rel.task(retries=3)
    def two_steps() -> None:
        step("one", ran.append, "one")
        step("two", ran.append, "two")

    handle = two_steps.enqueue()
    claimed = rel.store.claim("worker-a", ["default"], 1, clock.now(), 30).jobs[0]
    assert rel.cancel(handle.id)  # in another process: this attempt learns at its step
    outcome = run_attempt(rel, claimed)
    assert ran == ["one"]
    assert outcome.status == "cancelled"
    rel.store.settle("worker-a", [outcome])
    assert [s.name for s in rel.get_steps(handle.id)] == ["one"]
    assert rel.run_until_idle() == 0
    assert rel.get_job(handle.id).status == "cancelled"
