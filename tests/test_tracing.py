"""OpenTelemetry: a job's attempts and steps join the trace it was enqueued in, through
the trace context stored with the job; without OpenTelemetry nothing of it is imported
and jobs run the same."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from reliable import Reliable, step
from reliable.clock import ManualClock

REPO = Path(__file__).resolve().parent.parent
EXPORTER = InMemorySpanExporter()


class WhileTesting(SimpleSpanProcessor):
    """Keeps spans only while a test of this module runs (the provider, once set, stays
    for the rest of the process)."""

    active = False
    added = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


PROCESSOR = WhileTesting(EXPORTER)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)  # once per process: OpenTelemetry allows one
    if not WhileTesting.added:
        provider.add_span_processor(PROCESSOR)
        WhileTesting.added = True
    EXPORTER.clear()
    PROCESSOR.active = True
    yield EXPORTER
    PROCESSOR.active = False
    EXPORTER.clear()


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def test_attempts_and_steps_are_children_of_the_enqueue_span(
    rel: Reliable, clock: ManualClock, spans: InMemorySpanExporter
) -> None:
    failures = {"left": 1}

    @rel.task(retries=1, backoff=lambda _state: 5)
    def checkout(order: int) -> int:
        total = step("price", lambda: order * 10)
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("payment service down")
        return step("charge", lambda: total + 1)

    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("http request") as request:
        handle = checkout.enqueue(4)
    rel.run_until_idle()
    clock.advance(5)
    rel.run_until_idle()
    assert handle.result(timeout=0) == 41

    [enqueue] = named(spans, "enqueue checkout")
    assert enqueue.kind == SpanKind.PRODUCER
    assert enqueue.parent is not None
    assert enqueue.parent.span_id == request.get_span_context().span_id
    assert enqueue.attributes is not None and enqueue.attributes["reliable.job_id"] == handle.id

    attempts = sorted(named(spans, "attempt checkout"), key=lambda s: s.start_time or 0)
    assert len(attempts) == 2
    trace_id = request.get_span_context().trace_id
    for number, attempt in enumerate(attempts, start=1):
        assert attempt.kind == SpanKind.CONSUMER
        assert attempt.context is not None and attempt.context.trace_id == trace_id
        assert attempt.parent is not None and attempt.parent.span_id == enqueue.context.span_id  # type: ignore[union-attr]
        assert [link.context.span_id for link in attempt.links] == [
            enqueue.context.span_id  # type: ignore[union-attr]
        ]
        assert attempt.attributes is not None
        assert attempt.attributes["reliable.attempt"] == number
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["reliable.outcome"] == "retry"  # type: ignore[index]
    assert attempts[1].status.status_code != StatusCode.ERROR
    assert attempts[1].attributes["reliable.outcome"] == "succeeded"  # type: ignore[index]

    # "price" ran once (its result is kept), inside the first attempt; "charge" inside
    # the second.
    [price] = named(spans, "step price")
    [charge] = named(spans, "step charge")
    assert price.parent is not None and price.parent.span_id == attempts[0].context.span_id  # type: ignore[union-attr]
    assert charge.parent is not None and charge.parent.span_id == attempts[1].context.span_id  # type: ignore[union-attr]


def test_a_job_enqueued_outside_any_trace_still_has_its_attempt_in_the_enqueue_trace(
    rel: Reliable, spans: InMemorySpanExporter
) -> None:
    @rel.task
    def ping() -> str:
        return "pong"

    handle = ping.enqueue()
    rel.run_until_idle()
    assert handle.result(timeout=0) == "pong"
    [enqueue] = named(spans, "enqueue ping")
    [attempt] = named(spans, "attempt ping")
    assert enqueue.parent is None  # a new trace starts at the enqueue
    assert attempt.context is not None and enqueue.context is not None
    assert attempt.context.trace_id == enqueue.context.trace_id


WITHOUT_OPENTELEMETRY = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Block())
from reliable import Reliable, step
rel = Reliable(sys.argv[1], embedded_worker=False)

@rel.task
def twice(x):
    return step("double", lambda: 2 * x)

handle = twice.enqueue(21)
rel.run_until_idle()
print(handle.result(timeout=0), [m for m in sys.modules if m.startswith("opentelemetry")])
"""


def test_without_opentelemetry_jobs_run_and_nothing_of_it_is_imported(db_url: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_OPENTELEMETRY, db_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["42", "[]"]
