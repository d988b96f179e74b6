"""Optional OpenTelemetry spans: one per enqueue, per attempt and per step.

When ``opentelemetry-api`` is installed, enqueueing a job opens a span whose trace
context (W3C ``traceparent``) is stored with the job; each attempt of the job runs in a
span that is a child of that enqueue span (and links to it), and each step of the
attempt in a child span of the attempt's. Spans go wherever the application's
``TracerProvider`` sends them; without one configured (or without the package), these
are no-ops, and without the package nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # tracing is optional
    trace = None  # type: ignore[assignment]

TRACER_NAME = "reliable"
_PROPAGATOR: Any = None if trace is None else TraceContextTextMapPropagator()
# OpenTelemetry also takes a tracer provider named by this variable.
_PROVIDER_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def enabled() -> bool:
    """Whether ``opentelemetry-api`` is installed (spans may be recorded)."""
    return trace is not None


def recording() -> bool:
    """Whether the application has set a tracer provider: until it does, OpenTelemetry's
    default one records nothing, and spans are skipped (they cost microseconds a job)."""
    if trace is None:
        return False
    if getattr(trace, "_TRACER_PROVIDER", None) is None and not _PROVIDER_FROM_ENVIRONMENT:
        return False  # none set (the cheap look, on every attempt's path)
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@contextlib.contextmanager
def enqueue_span(task: str, job_id: str) -> Iterator[str | None]:
    """A span around enqueueing ``job_id``; yields the trace context to store with the
    job (``None`` without OpenTelemetry or without a recording span)."""
    if not recording():
        yield None
        return
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"enqueue {task}",
        kind=SpanKind.PRODUCER,
        attributes={"reliable.task": task, "reliable.job_id": job_id},
    ):
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        yield carrier.get("traceparent")


class AttemptSpan:
    """The span of one attempt (or nothing), ended with the attempt's outcome."""

    def __init__(self, span: Any) -> None:
        self.span = span

    def outcome(self, outcome: str, error: str | None) -> None:
        """Record how the attempt ended (``succeeded``, ``retry``, ...) and its error."""
        if self.span is None:
            return
        self.span.set_attribute("reliable.outcome", outcome)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error[:200]))


@contextlib.contextmanager
def attempt_span(
    task: str, job_id: str, attempt: int, trace_context: str | None
) -> Iterator[AttemptSpan]:
    """The current span while an attempt of ``job_id`` runs: a child of the span that
    enqueued the job (``trace_context``), linked to it as well."""
    if not recording():
        yield AttemptSpan(None)
        return
    parent = None
    links = []
    if trace_context:
        parent = _PROPAGATOR.extract({"traceparent": trace_context})
        enqueued = trace.get_current_span(parent).get_span_context()
        if enqueued.is_valid:
            links.append(Link(enqueued))
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"attempt {task}",
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes={"reliable.task": task, "reliable.job_id": job_id, "reliable.attempt": attempt},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield AttemptSpan(span)


@contextlib.contextmanager
def step_span(name: str, job_id: str) -> Iterator[None]:
    """A span around running step ``name`` of ``job_id``, a child of the current one
    (the attempt's)."""
    if not recording():
        yield
        return
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"step {name}", attributes={"reliable.step": name, "reliable.job_id": job_id}
    ):
        yield
