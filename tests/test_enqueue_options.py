"""The options of one enqueue (``task.options(...).enqueue(...)``): when a job is due, its
priority, queue and idempotency key, kept apart from the task's own parameters."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reliable import ConfigError, ManualClock, Reliable


def test_a_delay_makes_the_job_due_that_much_later(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def send_invoice(order_id: int) -> int:
        return order_id

    handle = send_invoice.options(delay="10m").enqueue(42)
    info = rel.get_job(handle.id)
    assert info.run_at.timestamp() == clock.now() + 600
    assert info.created_at.timestamp() == clock.now()
    assert rel.run_until_idle() == 0
    clock.advance(599)
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=1) == 42


def test_run_at_takes_an_aware_datetime_in_any_zone(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def remind() -> str:
        return "done"

    due = datetime.fromtimestamp(clock.now() + 3600, tz=ZoneInfo("Europe/Berlin"))
    handle = remind.options(run_at=due).enqueue()
    assert rel.get_job(handle.id).run_at == due.astimezone(timezone.utc)
    clock.advance(3599)
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 1
    past = remind.options(run_at=datetime.fromtimestamp(0, tz=timezone.utc)).enqueue()
    assert rel.run_until_idle() == 1  # a time in the past is due at once
    assert past.status() == "succeeded"


def test_priority_and_queue_of_one_call(rel: Reliable) -> None:
    order: list[str] = []

    @rel.task(priority=1)
    def work(name: str) -> None:
        order.append(name)

    work.enqueue("first")
    work.options(priority=5).enqueue("urgent")
    work.options(priority=-3).enqueue("last")
    bulk = work.options(queue="bulk").enqueue("bulk")
    assert rel.run_until_idle() == 3
    assert order == ["urgent", "first", "last"]
    info = rel.get_job(bulk.id)
    assert (info.queue, info.priority, info.status) == ("bulk", 1, "queued")
    assert rel.run_until_idle(queues=["bulk"]) == 1
    assert order[-1] == "bulk"


def test_an_idempotency_key_of_one_call(rel: Reliable) -> None:
    @rel.task
    def charge(amount: int) -> int:
        return amount

    first = charge.options(idempotency_key="order-7", delay=60).enqueue(10)
    again = charge.options(idempotency_key="order-7").enqueue(10)
    shorthand = charge.enqueue(10, idempotency_key="order-7")
    assert again.id == first.id == shorthand.id
    assert again.replayed and not first.replayed
    assert rel.get_job(first.id).idempotency_key == "order-7"
    assert rel.store.count_by_status() == {"queued": 1}


def test_parameters_named_like_options_are_the_task_s_arguments(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def notify(delay: int, priority: str, queue: str = "q", run_at: str = "r") -> list[Any]:
        return [delay, priority, queue, run_at]

    now = notify.enqueue(delay=5, priority="high")
    later = notify.options(delay=60, priority=2).enqueue(
        delay=7, priority="low", queue="mine", run_at="noon"
    )
    assert rel.get_job(now.id).run_at.timestamp() == clock.now()
    assert (rel.get_job(now.id).priority, rel.get_job(now.id).queue) == (0, "default")
    assert rel.get_job(later.id).run_at.timestamp() == clock.now() + 60
    assert rel.get_job(later.id).priority == 2
    clock.advance(60)
    assert rel.run_until_idle() == 2
    assert now.result(timeout=1) == [5, "high", "q", "r"]
    assert later.result(timeout=1) == [7, "low", "mine", "noon"]


@pytest.mark.parametrize(
    ("options", "name", "message"),
    [
        ({"run_at": datetime(2030, 1, 1, 12, 0)}, "run_at", "naive"),
        ({"run_at": "2030-01-01T12:00:00Z"}, "run_at", "aware datetime"),
        ({"delay": -1}, "delay", ">= 0"),
        ({"delay": timedelta(seconds=-5)}, "delay", ">= 0"),
        ({"delay": "soon"}, "delay", "duration"),
        ({"delay": 5, "run_at": datetime(2030, 1, 1, tzinfo=timezone.utc)}, "run_at", "not both"),
        ({"priority": "high"}, "priority", "whole number"),
        ({"priority": True}, "priority", "whole number"),
        ({"queue": "a,b"}, "queue", "no commas"),
        ({"queue": ""}, "queue", "1 to 100"),
        ({"idempotency_key": ""}, "idempotency_key", "1 to 255"),
        ({"idempotency_key": "k" * 256}, "idempotency_key", "256 characters"),
        ({"start_within": 0}, "start_within", "> 0"),
        ({"finish_within": "-1m"}, "finish_within", "duration"),
    ],
)
def test_a_bad_option_is_a_clear_error_when_given_and_stores_nothing(
    rel: Reliable, options: dict[str, Any], name: str, message: str
) -> None:
    @rel.task
    def send_invoice(order_id: int) -> None: ...

    with pytest.raises(ConfigError, match=message) as raised:
        send_invoice.options(**options)
    assert raised.value.name == name
    assert rel.store.count_by_status() == {}


def test_an_unknown_option_is_a_type_error(rel: Reliable) -> None:
    @rel.task
    def send_invoice(order_id: int) -> None: ...

    with pytest.raises(TypeError, match="dealy"):
        send_invoice.options(dealy="10m")  # type: ignore[call-arg]


def test_a_call_s_options_are_immutable_and_reusable(rel: Reliable, clock: ManualClock) -> None:
    @rel.task
    def ping(n: int) -> int:
        return n

    later = ping.options(delay=30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        later.options = dataclasses.replace(later.options, delay=0)  # type: ignore[misc]
    handles = [later.enqueue(1), later.enqueue(2)]
    assert all(rel.get_job(h.id).run_at.timestamp() == clock.now() + 30 for h in handles)
    with pytest.raises(TypeError, match="nothing was stored"):
        later.enqueue("one", "two")  # type: ignore[call-arg]
    assert rel.store.count_by_status() == {"queued": 2}


def test_the_task_s_options_still_read_as_attributes(rel: Reliable) -> None:
    @rel.task(priority=3, queue="mail", retries=2, start_within="5m")
    def send(to: str) -> None: ...

    assert (send.options.priority, send.options.queue, send.options.retries) == (3, "mail", 2)
    assert send.options.start_within == 300.0
    assert send.options(priority=9).options.priority == 9
