"""Prometheus metrics of one application: jobs by state and task, attempts and failures,
queue wait and run time, slots in use, rate-limit refusals, worker heartbeats.

``exposition(runtime)`` renders them in the Prometheus text format, from a registry of
this runtime's own (never the process-wide default one). It needs ``prometheus-client``
(``pip install 'reliable[metrics]'``). Every scrape costs the same at the millionth job
as at the first: job counts are bounded reads on indexes (see ``JOBS_CAPS``), the rest
are small tables (slots, rate limits, workers) or this process's own counters.
``serve_metrics`` serves them over HTTP from a thread (``reliable worker
--metrics-port``).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError
from .runtime import Runtime
from .store.operator import JobFilter
from .telemetry import Histogram

INSTALL = "pip install 'reliable[metrics]'"
# Each count of jobs in one status stops at its cap (the store reads no further on its
# index): a gauge at the cap + 1 means "at least that many". Unfinished jobs are the
# backlog an alert watches; finished ones only grow until they are purged.
JOBS_CAPS = {
    "queued": 100_000,
    "running": 100_000,
    "sleeping": 100_000,
    "succeeded": 10_000,
    "failed": 10_000,
    "cancelled": 10_000,
}
# A worker whose heartbeat is older than this many lease periods is left out: it is gone.
WORKER_LEASES = 3


def _scope(scope: str) -> tuple[str, str, str]:
    """A flow-control scope (``task#option#key``) as its three labels."""
    task, option, key = [*scope.split("#", 2), "", ""][:3]
    return task, option, key


def _histogram(family: Any, task: str, histogram: Histogram) -> None:
    family.add_metric([task], histogram.cumulative(), histogram.total)


class RuntimeCollector:
    """A prometheus-client collector reading one runtime's store and counters."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> list[Any]:
        return []  # not described ahead: collect reads the store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        runtime = self.runtime
        store = runtime.store
        now = runtime.clock.now()

        jobs = GaugeMetricFamily(
            "reliable_jobs",
            "Jobs in each status (a count stops at 100,001 for unfinished jobs and 10,001 "
            "for finished ones: at least that many)",
            labels=["status"],
        )
        for status, cap in JOBS_CAPS.items():
            jobs.add_metric([status], store.count_matching(JobFilter(statuses=(status,)), cap))
        yield jobs

        recent = GaugeMetricFamily(
            "reliable_recent_jobs",
            "Among the newest 10,000 jobs: how many of each task are in each status",
            labels=["task", "status"],
        )
        for task, statuses in sorted(store.recent_by_task().items()):
            for status, count in sorted(statuses.items()):
                recent.add_metric([task, status], count)
        yield recent

        started, ended, waits, runs, refusals = runtime.counters.snapshot()
        attempts = CounterMetricFamily(
            "reliable_attempts_started",
            "Attempts this process started, by task",
            labels=["task"],
        )
        for task, count in sorted(started.items()):
            attempts.add_metric([task], count)
        yield attempts
        outcomes = CounterMetricFamily(
            "reliable_attempts",
            "Attempts this process ended, by task and outcome (succeeded, failed, retry, "
            "sleeping, cancelled, released, error)",
            labels=["task", "outcome"],
        )
        failures = CounterMetricFamily(
            "reliable_attempt_failures",
            "Attempts this process ended in an error (retried or failed), by task",
            labels=["task"],
        )
        failed: dict[str, int] = {}
        for (task, outcome), count in sorted(ended.items()):
            outcomes.add_metric([task, outcome], count)
            if outcome in ("failed", "retry", "error"):
                failed[task] = failed.get(task, 0) + count
        for task, count in sorted(failed.items()):
            failures.add_metric([task], count)
        yield outcomes
        yield failures

        wait = HistogramMetricFamily(
            "reliable_queue_wait_seconds",
            "How long jobs waited from due to their attempt's start, in this process",
            labels=["task"],
        )
        for task, histogram in sorted(waits.items()):
            _histogram(wait, task, histogram)
        yield wait
        run = HistogramMetricFamily(
            "reliable_run_seconds",
            "How long this process's attempts ran, by task",
            labels=["task"],
        )
        for task, histogram in sorted(runs.items()):
            _histogram(run, task, histogram)
        yield run

        flow = store.flow_state(now)
        labels = ["task", "option", "key"]
        in_use = GaugeMetricFamily(
            "reliable_slots_in_use", "Concurrency slots taken, per scope", labels=labels
        )
        capacity = GaugeMetricFamily(
            "reliable_slots_limit", "Concurrency slots of each scope", labels=labels
        )
        for row in flow["concurrency"]:
            key = [row["task"], row["option"], row["key"]]
            in_use.add_metric(key, row["in_use"])
            capacity.add_metric(key, row["limit"])
        yield in_use
        yield capacity
        used = GaugeMetricFamily(
            "reliable_rate_limit_used",
            "Admissions in the current rate-limit window, per scope",
            labels=labels,
        )
        for row in flow["rate_limits"]:
            used.add_metric([row["task"], row["option"], row["key"]], row["used"])
        yield used
        refused = CounterMetricFamily(
            "reliable_rate_limit_refusals",
            "Enqueues a rate limit refused in this process, per scope",
            labels=labels,
        )
        for scope, count in sorted(refusals.items()):
            refused.add_metric(list(_scope(scope)), count)
        yield refused

        within = WORKER_LEASES * runtime.settings.lease_seconds
        age = GaugeMetricFamily(
            "reliable_worker_heartbeat_age_seconds",
            "Seconds since each live worker's last heartbeat",
            labels=["worker", "hostname", "pid"],
        )
        live = 0
        for worker in store.list_workers():
            seconds = max(0.0, now - worker.heartbeat_at)
            if seconds <= within:
                live += 1
                age.add_metric([worker.id, worker.hostname, str(worker.pid)], seconds)
        yield age
        yield GaugeMetricFamily("reliable_workers", "Live worker processes", value=live)


def exposition(runtime: Runtime) -> tuple[bytes, str]:
    """The Prometheus text exposition of this runtime's metrics: (body, content type)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        raise ConfigError(
            "metrics", f"the metrics need prometheus-client, which is not installed: {INSTALL}"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return generate_latest(registry), str(CONTENT_TYPE_LATEST)


def serve_metrics(runtime: Runtime, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve ``exposition(runtime)`` at ``http://host:port/metrics`` from a daemon
    thread; ``shutdown()`` the server returned to stop. Raises ``ConfigError`` when
    prometheus-client is missing or the port cannot be bound."""
    exposition(runtime)  # fail now, not at the first scrape, without prometheus-client

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "the metrics are at /metrics")
                return
            try:
                body, content_type = exposition(runtime)
            except Exception as exc:  # the store is down: say so, keep serving
                self.send_error(503, f"metrics unavailable: {type(exc).__name__}")
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not worth a log line

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ConfigError(
            "--metrics-port", f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="reliable-metrics", daemon=True)
    thread.start()
    return server
