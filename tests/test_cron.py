"""Cron schedules: ticks in a time zone (daylight saving time included), one job per
tick across any number of applications and processes, catch-up after downtime, and
what ``rel.schedules()`` shows. Time is an injected clock, except with real processes."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from support import Processes, query, start_workers, wait_until

from reliable import ConfigError, ManualClock, Reliable
from reliable.cron import Cron

BERLIN = ZoneInfo("Europe/Berlin")


def at(*parts: int, tz: Any = timezone.utc) -> float:
    return datetime(*parts, tzinfo=tz).timestamp()  # type: ignore[misc]


def labels(cron: Cron, start: float, count: int) -> list[str]:
    ticks, instant = [], start
    for _ in range(count):
        instant = cron.next_after(instant)
        ticks.append(cron.label(instant))
    return ticks


def ticks_of(app: Reliable) -> list[str]:
    """The ticks the jobs were made for (their idempotency keys), in time order."""
    keys = [row.idempotency_key for row in query(app, "SELECT idempotency_key FROM reliable_jobs")]
    return sorted(keys, key=lambda key: datetime.fromisoformat(key).timestamp())


def step_clock(app: Reliable, clock: ManualClock, until: float, step: float) -> None:
    """Move the clock to ``until`` in steps, enqueueing the due ticks at each."""
    while clock.now() < until:
        clock.advance(min(step, until - clock.now()))
        app.timetable.enqueue_due()


# -- ticks in a zone ------------------------------------------------------------------------


def test_spring_forward_a_tick_in_the_skipped_hour_runs_once_when_it_ends() -> None:
    daily = Cron("30 2 * * *", "Europe/Berlin")
    assert labels(daily, at(2024, 3, 30, 12, tz=BERLIN), 3) == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]
    every_half_hour = Cron("*/30 * * * *", "Europe/Berlin")
    assert labels(every_half_hour, at(2024, 3, 31, 1, tz=BERLIN), 3) == [
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T03:30:00+02:00",
    ]


def test_fall_back_fixed_hours_tick_once_and_every_hour_ticks_through_both_passes() -> None:
    daily = Cron("30 2 * * *", "Europe/Berlin")
    assert labels(daily, at(2024, 10, 26, 12, tz=BERLIN), 2) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
    ]
    assert daily.latest_until(at(2024, 10, 27, 4, tz=BERLIN)) == at(2024, 10, 27, 0, 30)
    every_half_hour = Cron("*/30 * * * *", "Europe/Berlin")
    assert labels(every_half_hour, at(2024, 10, 27, 1, 45, tz=BERLIN), 5) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T02:30:00+01:00",
        "2024-10-27T03:00:00+01:00",
    ]


def test_ticks_follow_the_zone_s_wall_clock_in_winter_and_summer() -> None:
    nine = Cron("0 9 * * *", "Europe/Berlin")
    assert nine.next_after(at(2024, 1, 10)) == at(2024, 1, 10, 8)  # 09:00 CET
    assert nine.next_after(at(2024, 7, 10)) == at(2024, 7, 10, 7)  # 09:00 CEST
    assert Cron("*/5 * * * *").latest_until(at(2024, 1, 1, 10, 5)) == at(2024, 1, 1, 10, 5)


@pytest.mark.parametrize(
    ("expression", "tz", "name"),
    [
        ("* * *", "UTC", "cron"),
        ("61 * * * *", "UTC", "cron"),
        ("0 0 31 2 *", "UTC", "cron"),
        ("*/5 * * * *", "Mars/Olympus", "tz"),
        ("*/5 * * * *", "", "tz"),
    ],
)
def test_a_bad_expression_or_zone_is_refused_by_name(expression: str, tz: str, name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Cron(expression, tz)
    assert raised.value.name == name


# -- schedules of one application -------------------------------------------------------------


def test_a_new_schedule_starts_at_its_next_tick_and_makes_one_job_per_tick(
    rel: Reliable, clock: ManualClock
) -> None:
    runs: list[str] = []

    @rel.cron("*/5 * * * *", tz="Europe/Berlin")
    def nightly() -> None:
        runs.append("ran")

    clock.set(at(2024, 1, 1, 10, 2))  # a tick at 10:00 was before the schedule existed
    assert rel.run_until_idle() == 0
    clock.set(at(2024, 1, 1, 10, 4, 59))
    assert rel.run_until_idle() == 0
    clock.set(at(2024, 1, 1, 10, 5))
    assert rel.run_until_idle() == 1
    assert rel.run_until_idle() == 0  # the same tick again makes nothing
    clock.advance(299)
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 1
    assert runs == ["ran", "ran"]
    assert ticks_of(rel) == ["2024-01-01T11:05:00+01:00", "2024-01-01T11:10:00+01:00"]
    job = query(rel, "SELECT idempotency_key FROM reliable_jobs ORDER BY run_at")[0]
    assert job.idempotency_key == "2024-01-01T11:05:00+01:00"


def test_missed_ticks_run_once_after_downtime_by_default(rel: Reliable, clock: ManualClock) -> None:
    @rel.cron("*/5 * * * *")
    def sync() -> None: ...

    clock.set(at(2024, 1, 1, 10, 2))
    rel.timetable.enqueue_due()
    clock.set(at(2024, 1, 1, 11, 3))  # twelve ticks missed
    assert rel.run_until_idle() == 1
    assert ticks_of(rel) == ["2024-01-01T11:00:00+00:00"]


def test_catch_up_all_runs_every_missed_tick_and_max_lateness_skips_old_ones(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.cron("*/5 * * * *", catch_up="all")
    def every() -> None: ...

    @rel.cron("*/5 * * * *", catch_up="all", max_lateness="15m")
    def recent() -> None: ...

    @rel.cron("*/5 * * * *", max_lateness="2m")
    def fresh() -> None: ...

    clock.set(at(2024, 1, 1, 10, 2))
    rel.timetable.enqueue_due()
    clock.set(at(2024, 1, 1, 11, 3))
    assert rel.run_until_idle() == 12 + 3
    rows = query(rel, "SELECT task, count(*) AS n FROM reliable_jobs GROUP BY task")
    assert {row.task: row.n for row in rows} == {"every": 12, "recent": 3}
    clock.set(at(2024, 1, 1, 11, 5, 30))  # each makes its next tick again
    assert rel.run_until_idle() == 3


def test_daylight_saving_time_with_the_injected_clock(rel: Reliable, clock: ManualClock) -> None:
    @rel.cron("30 2 * * *", tz="Europe/Berlin")
    def daily() -> None: ...

    @rel.cron("*/30 * * * *", tz="Europe/Berlin")
    def half_hourly() -> None: ...

    clock.set(at(2024, 3, 31, 1, 10, tz=BERLIN))
    rel.timetable.enqueue_due()
    step_clock(rel, clock, at(2024, 3, 31, 4, 0, tz=BERLIN), 600)
    assert ticks_of(rel) == [
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:00:00+02:00",  # daily: 02:30 does not exist; it runs at 03:00
        "2024-03-31T03:00:00+02:00",  # half_hourly
        "2024-03-31T03:30:00+02:00",
        "2024-03-31T04:00:00+02:00",
    ]
    rel.run_until_idle()
    clock.set(at(2024, 10, 27, 1, 10, tz=BERLIN))
    rel.timetable.enqueue_due()  # collapses what half_hourly missed since spring into one
    rel.run_until_idle()
    query_before = len(ticks_of(rel))
    step_clock(rel, clock, at(2024, 10, 27, 3, 5, tz=BERLIN), 600)
    assert ticks_of(rel)[query_before:] == [
        "2024-10-27T01:30:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",  # daily: once, at the first pass
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:00:00+01:00",  # half_hourly: through the repeated hour
        "2024-10-27T02:30:00+01:00",
        "2024-10-27T03:00:00+01:00",
    ]


def test_schedules_show_the_last_and_next_run(rel: Reliable, clock: ManualClock) -> None:
    @rel.cron("0 * * * *", tz="Europe/Berlin", catch_up="all")
    def hourly() -> str:
        return "done"

    clock.set(at(2024, 1, 1, 10, 30))
    [info] = rel.schedules()
    assert (info.name, info.cron, info.timezone, info.catch_up) == (
        "hourly",
        "0 * * * *",
        "Europe/Berlin",
        "all",
    )
    assert (info.last_run_at, info.last_job_id, info.last_status) == (None, None, None)
    assert info.next_run_at == datetime(2024, 1, 1, 11, tzinfo=timezone.utc)
    rel.run_until_idle()
    clock.set(at(2024, 1, 1, 11, 0, 1))
    assert rel.run_until_idle() == 1
    [info] = rel.schedules()
    assert info.last_run_at == datetime(2024, 1, 1, 11, tzinfo=timezone.utc)
    assert info.last_job_id is not None and info.last_status == "succeeded"
    assert rel.get_job(info.last_job_id).result == "done"
    assert info.next_run_at == datetime(2024, 1, 1, 12, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("args", "options", "name"),
    [
        (("every minute",), {}, "cron"),
        (("* * * * *",), {"tz": "Nowhere/City"}, "tz"),
        (("* * * * *",), {"catch_up": "never"}, "catch_up"),
        (("* * * * *",), {"max_lateness": 0}, "max_lateness"),
        (("* * * * *",), {"retries": -1}, "retries"),
    ],
)
def test_a_bad_schedule_is_refused_when_declared_and_registers_nothing(
    rel: Reliable, args: tuple[str], options: dict[str, Any], name: str
) -> None:
    with pytest.raises(ConfigError) as raised:

        @rel.cron(*args, **options)
        def job() -> None: ...

    assert raised.value.name == name
    assert rel.tasks == {} and rel.schedules() == []


def test_a_scheduled_function_must_take_no_arguments(rel: Reliable) -> None:
    with pytest.raises(ConfigError, match="no arguments"):

        @rel.cron("* * * * *")
        def needs(order_id: int) -> None: ...


def test_a_worker_enqueues_the_due_ticks(db_url: str, clock: ManualClock) -> None:
    app = Reliable(db_url, clock=clock, embedded_worker=False, poll_interval=0.05)
    ran = threading.Event()

    @app.cron("*/10 * * * *")
    def tick() -> None:
        ran.set()

    clock.set(at(2024, 1, 1, 10, 0, 30))
    try:
        app.start_worker(threads=1)
        wait_until(
            lambda: bool(query(app, "SELECT name FROM reliable_schedules")), 10, "registered", str
        )
        clock.set(at(2024, 1, 1, 10, 10))
        assert ran.wait(10)
    finally:
        app.close()


# -- many applications, many processes --------------------------------------------------------


@pytest.fixture
def three(db_url: str, clock: ManualClock) -> Iterator[list[Reliable]]:
    apps = [Reliable(db_url, clock=clock, embedded_worker=False) for _ in range(3)]
    for app in apps:
        app.store.get_status("none")  # opened one after another: the race is per tick

        @app.cron("*/5 * * * *", catch_up="all")
        def report() -> None: ...

    yield apps
    for app in apps:
        app.close()


def test_three_applications_racing_on_every_tick_make_one_job_per_tick(
    three: list[Reliable], clock: ManualClock
) -> None:
    clock.set(at(2024, 1, 1, 10, 0))
    barrier = threading.Barrier(len(three))
    made: list[int] = []
    errors: list[BaseException] = []

    def race(app: Reliable) -> None:
        try:
            barrier.wait(timeout=30)
            made.append(app.timetable.enqueue_due())
        except BaseException as exc:
            errors.append(exc)

    for _ in range(7):  # at 10:00 (each registers), then on each tick up to 10:30
        threads = [threading.Thread(target=race, args=(app,)) for app in three]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        clock.advance(300)
    assert errors == []
    ticks = Counter(ticks_of(three[0]))
    assert list(ticks.values()) == [1] * 6
    assert sorted(ticks) == [f"2024-01-01T10:{m:02d}:00+00:00" for m in range(5, 35, 5)]
    assert sum(made) == 6


@pytest.mark.slow
def test_three_worker_processes_make_one_job_per_tick(tmp_path: Path, db_url: str) -> None:
    client = Reliable(db_url, embedded_worker=False)
    with Processes(tmp_path, db_url, app="tests.apps.cron_app:rel") as processes:
        start_workers(processes, client, 3, threads=1)
        wait_until(
            lambda: len(query(client, "SELECT id FROM reliable_jobs")) >= 6,
            60,
            "six ticks",
            processes.logs,
        )
        for worker in processes.started:
            worker.kill()
    ticks = [round(datetime.fromisoformat(key).timestamp()) for key in ticks_of(client)]
    client.close()
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # one each, none missed
