"""Prometheus metrics: what an operator scrapes is parseable and tells the truth about
jobs, attempts, waits, slots, rate limits and workers; every runtime has its own
registry; a scrape reads bounded index ranges, never the whole jobs table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from reliable import ConfigError, RateLimit, RateLimited, Reliable
from reliable.clock import ManualClock
from reliable.metrics import exposition, serve_metrics

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def scrape(rel: Reliable) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, by name and labels."""
    body, content_type = exposition(rel.runtime)
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def parse(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_jobs_attempts_failures_and_waits_are_counted(rel: Reliable, clock: ManualClock) -> None:
    calls = {"flaky": 0}

    @rel.task(retries=1, backoff=lambda _state: 10)
    def flaky() -> None:
        calls["flaky"] += 1
        raise RuntimeError("down")

    @rel.task
    def fine(x: int) -> int:
        return x

    for i in range(3):
        fine.enqueue(i)
    flaky.enqueue()
    waiting = fine.options(delay="1h").enqueue(9)
    clock.advance(5)  # the three due jobs wait 5 s before their attempts start
    rel.run_until_idle()
    clock.advance(10)
    rel.run_until_idle()

    samples = scrape(rel)
    assert samples["reliable_jobs", (("status", "succeeded"),)] == 3
    assert samples["reliable_jobs", (("status", "failed"),)] == 1
    assert samples["reliable_jobs", (("status", "queued"),)] == 1
    assert samples["reliable_recent_jobs", (("status", "queued"), ("task", "fine"))] == 1
    assert samples["reliable_attempts_started_total", (("task", "fine"),)] == 3
    assert samples["reliable_attempts_started_total", (("task", "flaky"),)] == 2
    assert samples["reliable_attempts_total", (("outcome", "succeeded"), ("task", "fine"))] == 3
    assert samples["reliable_attempts_total", (("outcome", "retry"), ("task", "flaky"))] == 1
    assert samples["reliable_attempts_total", (("outcome", "failed"), ("task", "flaky"))] == 1
    assert samples["reliable_attempt_failures_total", (("task", "flaky"),)] == 2
    assert ("reliable_attempt_failures_total", (("task", "fine"),)) not in samples
    # Queue wait: from due to start, on the application's clock.
    assert samples["reliable_queue_wait_seconds_count", (("task", "fine"),)] == 3
    assert samples["reliable_queue_wait_seconds_sum", (("task", "fine"),)] == pytest.approx(15)
    assert samples["reliable_queue_wait_seconds_bucket", (("le", "2.5"), ("task", "fine"))] == 0
    assert samples["reliable_queue_wait_seconds_bucket", (("le", "5.0"), ("task", "fine"))] == 3
    assert samples["reliable_run_seconds_count", (("task", "flaky"),)] == 2
    assert samples["reliable_run_seconds_bucket", (("le", "+Inf"), ("task", "fine"))] == 3
    assert rel.get_job(waiting.id).status == "queued"


def test_slots_in_use_and_rate_limit_refusals_per_key(rel: Reliable) -> None:
    @rel.task(concurrency=2)
    def capped() -> None:
        pass

    @rel.task(rate_limit=RateLimit(1, per="1h", key="arg:user"))
    def notify(user: str) -> None:
        pass

    capped.enqueue()
    rel.run_until_idle()
    notify.enqueue("ann")
    for _ in range(2):
        with pytest.raises(RateLimited):
            notify.enqueue("ann")
    notify.enqueue("bob")

    samples = scrape(rel)
    slots = [(n, dict(labels), v) for (n, labels), v in samples.items() if "slots" in n]
    assert [(n, d["task"], v) for n, d, v in slots if n == "reliable_slots_limit"] == [
        ("reliable_slots_limit", "capped", 2)
    ]
    assert [v for n, _, v in slots if n == "reliable_slots_in_use"] == [0]
    refusals = {
        dict(labels)["key"]: value
        for (name, labels), value in samples.items()
        if name == "reliable_rate_limit_refusals_total"
    }
    assert refusals == {"ann": 2}
    used = {
        dict(labels)["key"]: value
        for (name, labels), value in samples.items()
        if name == "reliable_rate_limit_used"
    }
    assert used == {"ann": 1, "bob": 1}


def test_each_runtime_has_its_own_registry(db_url: str, tmp_path: Path) -> None:
    first = Reliable(db_url, embedded_worker=False)
    second = Reliable(f"sqlite:///{tmp_path / 'other.db'}", embedded_worker=False)
    try:

        @first.task
        def only_here() -> None:
            pass

        only_here.enqueue()
        first.run_until_idle()
        assert scrape(first)["reliable_attempts_started_total", (("task", "only_here"),)] == 1
        assert not any(name.startswith("reliable_attempts") for name, _ in scrape(second))
        # Nothing lands in the process-wide default registry.
        assert not [n for n in REGISTRY._names_to_collectors if n.startswith("reliable_")]
    finally:
        first.close()
        second.close()


def test_without_prometheus_client_exposition_says_what_to_install(tmp_path: Path) -> None:
    program = f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "prometheus_client":
            raise ImportError(f"No module named {{name!r}}")
        return None

sys.meta_path.insert(0, Block())
from reliable import ConfigError, Reliable
from reliable.metrics import exposition
rel = Reliable("sqlite:///{tmp_path / "jobs.db"}", embedded_worker=False)
try:
    exposition(rel.runtime)
except ConfigError as exc:
    print(exc)
"""
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr
    assert "pip install 'reliable[metrics]'" in completed.stdout


def test_metrics_server_serves_the_exposition_and_refuses_a_taken_port(rel: Reliable) -> None:
    @rel.task
    def one() -> None:
        pass

    one.enqueue()
    rel.run_until_idle()
    server = serve_metrics(rel.runtime, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            samples = parse(response.read().decode())
        assert samples["reliable_attempts_started_total", (("task", "one"),)] == 1
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(rel.runtime, "127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def statements(rel: Reliable) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements run on ``rel``'s store while the test runs."""
    seen: list[tuple[str, Any]] = []
    engine = rel.store.engine

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_a_scrape_never_scans_the_jobs_table(
    rel: Reliable, statements: list[tuple[str, Any]]
) -> None:
    """Each read of ``reliable_jobs`` a scrape makes goes through an index, bounded by a
    limit: at a million jobs it reads what it reads at ten."""

    @rel.task
    def many() -> None:
        pass

    for _ in range(20):
        many.enqueue()
    statements.clear()
    scrape(rel)
    on_jobs = [(sql, params) for sql, params in statements if "reliable_jobs" in sql]
    assert on_jobs
    with rel.store.engine.connect() as connection:
        if rel.store.dialect == "postgresql":
            connection.exec_driver_sql("SET enable_seqscan = off")  # an index if any can
        for sql, params in on_jobs:
            assert re.search(r"\bLIMIT\b", sql, re.IGNORECASE), sql
            explain = "EXPLAIN QUERY PLAN " if rel.store.dialect == "sqlite" else "EXPLAIN "
            plan = "\n".join(
                str(row[-1]) if rel.store.dialect == "sqlite" else str(row[0])
                for row in connection.exec_driver_sql(explain + sql, params).all()
            )
            assert not re.search(r"SCAN reliable_jobs(?! USING)", plan), plan
            assert "Seq Scan on reliable_jobs" not in plan, plan
        connection.rollback()


# -- a real worker process ---------------------------------------------------------------


APP = """
from reliable import Reliable

rel = Reliable({url!r})


@rel.task
def double(x: int) -> int:
    return 2 * x
"""


def test_worker_metrics_port_serves_this_workers_attempts(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "metrics_app.py").write_text(APP.format(url=db_url))
    worker = subprocess.Popen(
        [str(BIN / "reliable"), "worker", "metrics_app:rel", "--metrics-port", "0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        assert worker.stderr is not None
        url = None
        for line in worker.stderr:
            found = re.search(r"metrics at (http://\S+/metrics)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        client = Reliable(db_url, embedded_worker=False)

        @client.task
        def double(x: int) -> int:
            raise AssertionError("runs in the worker process only")

        handles = [double.enqueue(i) for i in range(5)]
        assert [h.result(timeout=60) for h in handles] == [0, 2, 4, 6, 8]
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(url, timeout=10) as response:
                samples = parse(response.read().decode())
            done = samples.get(
                ("reliable_attempts_total", (("outcome", "succeeded"), ("task", "double")))
            )
            if done == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert done == 5
        assert samples["reliable_run_seconds_count", (("task", "double"),)] == 5
        assert samples["reliable_workers", ()] >= 1
        ages = [v for (n, _), v in samples.items() if n == "reliable_worker_heartbeat_age_seconds"]
        assert ages and all(age >= 0 for age in ages)
        client.close()
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        if worker.stderr is not None:
            worker.stderr.close()
    assert worker.returncode == 0
