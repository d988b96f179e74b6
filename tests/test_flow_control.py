"""Concurrency caps, rate limits, throttles, debouncing, keys: deterministic checks."""

from __future__ import annotations

import itertools

import pytest

from reliable import ConfigError, ManualClock, RateLimited, Reliable, current_job
from reliable.limits import Concurrency, MissingKey, RateLimit
from reliable.store import ClaimedJob, ClaimResult


def claim(rel: Reliable, worker: str, limit: int = 10) -> list[ClaimedJob]:
    return rel.store.claim(
        worker, ["default"], limit, rel.clock.now(), 30, tasks=list(rel.tasks), limited=True
    ).jobs


def finish(rel: Reliable, worker: str, jobs: list[ClaimedJob]) -> None:
    from reliable.execution import run_attempt

    rel.store.settle(worker, [run_attempt(rel, job) for job in jobs])


def test_concurrency_cap_holds_and_slots_come_back(rel: Reliable) -> None:
    @rel.task(concurrency=2)
    def work(i: int) -> int:
        return i

    for i in range(5):
        work.enqueue(i)
    first = claim(rel, "a")
    assert len(first) == 2
    assert claim(rel, "b") == []  # the cap is held across workers
    finish(rel, "a", first[:1])
    second = claim(rel, "b")
    assert len(second) == 1
    finish(rel, "a", first[1:])
    finish(rel, "b", second)
    assert len(claim(rel, "c")) == 2


def settle_and_claim(rel: Reliable, worker: str, job: ClaimedJob) -> ClaimResult:
    """Settle ``job``'s attempt and claim again, in one claim."""
    from reliable.execution import run_attempt

    return rel.store.claim(
        worker,
        ["default"],
        10,
        rel.clock.now(),
        30,
        [run_attempt(rel, job)],
        tasks=list(rel.tasks),
        limited=True,
    )


def test_a_slot_released_by_the_settle_of_a_claim_is_free_for_that_claim(rel: Reliable) -> None:
    @rel.task(concurrency=1)
    def work(i: int) -> int:
        return i

    work.enqueue(0)
    [first] = claim(rel, "a")
    work.enqueue(1)
    work.enqueue(2)
    # The claim reads the counter before it settles: it must see the slot come back.
    [second] = settle_and_claim(rel, "a", first).jobs
    assert second.holds_slots and second.id != first.id
    assert claim(rel, "b") == []  # and the cap still holds: the third job is parked
    assert rel.store.flow_state(rel.clock.now())["concurrency"][0]["in_use"] == 1
    # Settling the second unparks the third after the claim read the due jobs: the
    # claim says to claim again at once.
    result = settle_and_claim(rel, "a", second)
    assert result.jobs == [] and result.again
    [third] = claim(rel, "a")
    assert third.id not in (first.id, second.id)


def test_per_key_caps_are_independent(rel: Reliable) -> None:
    @rel.task(concurrency=Concurrency(1, key="arg:account"))
    def close(account: str, n: int) -> None: ...

    for n in range(3):
        close.enqueue("acct-1", n)
        close.enqueue("acct-2", n)
    running = claim(rel, "a")
    assert sorted(current_keys(rel, job) for job in running) == ["acct-1", "acct-2"]


def current_keys(rel: Reliable, job: ClaimedJob, option: str = "concurrency0") -> str:
    import json

    assert job.limits is not None
    return str(json.loads(job.limits)["keys"][option])


def test_several_caps_on_one_task_all_hold(rel: Reliable) -> None:
    @rel.task(concurrency=[3, Concurrency(1, key="arg:tenant")])
    def job(tenant: str, n: int) -> None: ...

    for n in range(3):
        for tenant in ("t1", "t2", "t3", "t4"):
            job.enqueue(tenant, n)
    running = claim(rel, "a", limit=20)
    assert len(running) == 3  # the global cap
    assert len({current_keys(rel, j, "concurrency1") for j in running}) == 3  # one per tenant
    assert claim(rel, "b", limit=20) == []  # every counter is known now, and still full
    finish(rel, "a", running[:1])
    [next_one] = claim(rel, "b", limit=20)  # one slot of each cap came back
    busy = {current_keys(rel, j, "concurrency1") for j in running[1:]}
    assert current_keys(rel, next_one, "concurrency1") not in busy


def test_a_cancelled_running_job_keeps_its_slot_until_its_attempt_ends(rel: Reliable) -> None:
    @rel.task(concurrency=1)
    def work(i: int) -> None: ...

    first, second = work.enqueue(1), work.enqueue(2)
    [running] = claim(rel, "a")
    assert running.id == first.id
    rel.cancel(first.id)
    assert first.status() == "cancelled"
    assert claim(rel, "b") == []  # its attempt may still run: the cap holds
    finish(rel, "a", [running])
    [next_one] = claim(rel, "b")
    assert next_one.id == second.id
    assert first.status() == "cancelled"


def test_expired_lease_gives_the_slot_back(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(concurrency=1)
    def work(i: int) -> None: ...

    work.enqueue(1)
    work.enqueue(2)
    assert len(claim(rel, "dead")) == 1
    assert claim(rel, "b") == []
    clock.advance(31)
    rel.store.recover_expired(clock.now())
    assert len(claim(rel, "b")) == 1


def test_saturated_key_does_not_block_other_keys(rel: Reliable) -> None:
    @rel.task(concurrency=Concurrency(1, key="arg:tenant"))
    def work(tenant: str, n: int) -> None: ...

    for n in range(300):
        work.enqueue("busy", n)
    claim(rel, "a", limit=1)  # busy holds its only slot
    assert claim(rel, "a", limit=10) == []  # parks busy's backlog
    other = work.enqueue("quiet", 0)
    assert [job.id for job in claim(rel, "b", limit=10)] == [other.id]


def test_rate_limit_refuses_past_the_limit_and_stores_nothing(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(rate_limit="3/minute")
    def notify(user: int) -> None: ...

    handles = [notify.enqueue(i) for i in range(3)]
    assert [h.rates[0].remaining for h in handles] == [2, 1, 0]
    with pytest.raises(RateLimited) as refused:
        notify.enqueue(99)
    assert refused.value.retry_after == pytest.approx(60)
    assert rel.store.count_by_status() == {"queued": 3}
    clock.advance(30)
    with pytest.raises(RateLimited):
        notify.enqueue(99)
    clock.advance(30.01)
    notify.enqueue(4)  # the window slid past the first three
    assert rel.store.count_by_status() == {"queued": 4}


def test_rate_limit_per_key(rel: Reliable) -> None:
    @rel.task(rate_limit=RateLimit(1, per="1h", key="arg:user"))
    def digest(user: str) -> None: ...

    digest.enqueue("ada")
    digest.enqueue("bob")
    with pytest.raises(RateLimited):
        digest.enqueue("ada")


def test_throttle_spaces_starts(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(throttle="2/10s")
    def ping(n: int) -> None: ...

    for n in range(5):
        ping.enqueue(n)
    starts = []
    for _ in range(30):
        for job in claim(rel, "a"):
            starts.append(clock.now())
            finish(rel, "a", [job])
        clock.advance(1)
    assert len(starts) == 5
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 5 for gap in gaps), starts


def test_debounce_collapses_calls_into_one_run_with_the_latest_arguments(
    rel: Reliable, clock: ManualClock
) -> None:
    seen = []

    @rel.task(debounce="5s", key="arg:doc", max_wait="12s")
    def reindex(doc: str, version: int) -> None:
        seen.append((doc, version))

    first = reindex.enqueue("a", 1)
    clock.advance(3)
    second = reindex.enqueue("a", 2)
    other = reindex.enqueue("b", 1)
    assert second.id == first.id and not second.created and other.id != first.id
    clock.advance(4)  # 7 s after the first call, 4 s after the last: not yet
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 2
    assert sorted(seen) == [("a", 2), ("b", 1)]


def test_debounce_max_wait_bounds_the_delay(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(debounce="5s", max_wait="8s")
    def flush(n: int) -> int:
        return n

    first = flush.enqueue(0)
    ran = []
    for n in range(1, 5):
        clock.advance(3)  # a steady stream: each call within 5 s of the last
        flush.enqueue(n)
        ran.append(rel.run_until_idle())
    # Without max_wait it would wait for a pause; with it, it ran 8 s after the first
    # call (at the first look after that), with the latest arguments by then.
    assert ran == [0, 0, 1, 0]
    assert first.result(timeout=1) == 3


def test_keys_are_resolved_and_visible_to_the_job(rel: Reliable) -> None:
    @rel.task(concurrency=Concurrency(2, key="arg:tenant"))
    def report(tenant: str) -> dict[str, str]:
        return current_job().keys

    handle = report.enqueue(tenant="acme")
    rel.run_until_idle()
    assert handle.result(timeout=1) == {"concurrency0": "acme"}


def test_missing_key_value_is_a_clear_error(rel: Reliable) -> None:
    @rel.task(concurrency=Concurrency(1, key="arg:tenant"))
    def report(tenant: str | None = None) -> None: ...

    with pytest.raises(MissingKey, match="arg:tenant"):
        report.enqueue()
    assert rel.store.count_by_status() == {}


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": "many"}, "concurrency"),
        ({"rate_limit": "ten per minute"}, "rate_limit"),
        ({"rate_limit": "10/fortnight"}, "rate_limit"),
        ({"throttle": "0/s"}, "throttle"),
        ({"debounce": "soon"}, "debounce"),
        ({"concurrency": Concurrency(1, key="arg:nope")}, "concurrency0"),
        ({"concurrency": Concurrency(1, key="header:X-Tenant")}, "concurrency0"),
        ({"rate_limit": RateLimit(1, key="colour:red")}, "rate_limit0"),
        ({"max_wait": "1m"}, "max_wait"),
    ],
)
def test_bad_flow_options_fail_when_the_decorator_runs(
    rel: Reliable, options: dict[str, object], name: str
) -> None:
    def fn(user: int) -> None: ...

    with pytest.raises(ConfigError, match=name):
        rel.task(**options)(fn)


def test_environment_overrides_the_decorator(
    rel: Reliable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELIABLE_TASK_SEND_INVOICE_CONCURRENCY", "4")
    monkeypatch.setenv("RELIABLE_TASK_SEND_INVOICE_RATE_LIMIT", "50/second")
    monkeypatch.setenv("RELIABLE_TASK_SEND_INVOICE_PRIORITY", "7")
    monkeypatch.setenv("RELIABLE_TASK_SEND_INVOICE_RETRIES", "9")
    monkeypatch.setenv("RELIABLE_TASK_SEND_INVOICE_TIMEOUT", "2m")
    monkeypatch.setenv("RELIABLE_TASK_SEND_INVOICE_THROTTLE", "5/minute")

    @rel.task(concurrency=Concurrency(1, key="arg:account"), rate_limit="1/hour", retries=1)
    def send_invoice(account: str) -> None: ...

    options = send_invoice.options
    assert options.flow.concurrency == (Concurrency(4, "arg:account"),)
    assert (options.flow.rate_limits[0].limit, options.flow.rate_limits[0].period) == (50, 1.0)
    assert (options.priority, options.retries, options.timeout) == (7, 9, 120.0)
    assert options.flow.throttle is not None and options.flow.throttle.interval == 12.0


@pytest.mark.parametrize(
    ("option", "value"),
    [("CONCURRENCY", "0"), ("RATE_LIMIT", "lots"), ("PRIORITY", "high"), ("TIMEOUT", "never")],
)
def test_bad_override_fails_at_start_up_naming_the_variable(
    rel: Reliable, monkeypatch: pytest.MonkeyPatch, option: str, value: str
) -> None:
    monkeypatch.setenv(f"RELIABLE_TASK_REPORT_{option}", value)
    with pytest.raises(ConfigError, match=f"RELIABLE_TASK_REPORT_{option}"):

        @rel.task
        def report() -> None: ...


def test_flow_state_shows_slots_and_windows(rel: Reliable, clock: ManualClock) -> None:
    @rel.task(concurrency=Concurrency(2, key="arg:tenant"), rate_limit="10/minute")
    def sync(tenant: str) -> None: ...

    sync.enqueue("acme")
    sync.enqueue("acme")
    claim(rel, "a", limit=1)
    state = rel.flow_state()
    assert state["concurrency"] == [
        {"task": "sync", "option": "concurrency0", "key": "acme", "in_use": 1, "limit": 2}
    ]
    [window] = state["rate_limits"]
    assert (window["task"], window["limit"], window["used"], window["period"]) == (
        "sync",
        10,
        2,
        60.0,
    )


def test_admissions_are_pruned_only_once_no_window_can_count_them(
    rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(rate_limit="2/10s")
    def ping(n: int) -> None: ...

    from sqlalchemy import func, select

    from reliable.store.schema import rate_events

    def kept() -> int:
        with rel.store.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(rate_events)).scalar())

    ping.enqueue(0)
    clock.advance(1)
    ping.enqueue(1)
    with pytest.raises(RateLimited):
        ping.enqueue(2)  # the window holds both, pruned or not
    assert rel.store.prune_rate_events(clock.now() + 50) == 0  # a period and a minute: kept
    assert kept() == 2
    clock.advance(10)
    ping.enqueue(3)  # the first left the window: admitted without any pruning
    assert rel.store.prune_rate_events(clock.now() + 80) == 3
    assert kept() == 0
