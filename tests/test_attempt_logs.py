"""One log line as each attempt starts and one as it ends, on the ``reliable.attempts``
logger: readable text, and the job id, task, attempt number, outcome and duration as
fields a log pipeline can index (``extra=``)."""

from __future__ import annotations

import json
import logging

import pytest

from reliable import Reliable
from reliable.clock import ManualClock


def attempt_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "reliable.attempts"]


def test_each_attempt_logs_its_start_and_its_end_with_fields(
    rel: Reliable, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    @rel.task(retries=1, backoff=lambda _state: 5)
    def sync_invoice(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    ok = sync_invoice.enqueue(3)
    bad = sync_invoice.enqueue(-1)
    with caplog.at_level(logging.DEBUG, logger="reliable.attempts"):
        rel.run_until_idle()
        clock.advance(5)
        rel.run_until_idle()

    records = attempt_records(caplog)
    by_job: dict[str, list[logging.LogRecord]] = {}
    for record in records:
        by_job.setdefault(record.job_id, []).append(record)  # type: ignore[attr-defined]
    assert [r.event for r in by_job[ok.id]] == ["attempt_started", "attempt_ended"]  # type: ignore[attr-defined]
    started, ended = by_job[ok.id]
    assert started.getMessage() == f"job {ok.id} (sync_invoice): attempt 1 started"
    assert (ended.task, ended.attempt, ended.outcome) == ("sync_invoice", 1, "succeeded")  # type: ignore[attr-defined]
    assert ended.duration >= 0  # type: ignore[attr-defined]
    assert ended.getMessage().startswith(f"job {ok.id} (sync_invoice): attempt 1 ended: succeeded")

    # The failing job: attempt 1 ends in a retry, attempt 2 in failure.
    ends = [r for r in by_job[bad.id] if r.event == "attempt_ended"]  # type: ignore[attr-defined]
    assert [(r.attempt, r.outcome) for r in ends] == [(1, "retry"), (2, "failed")]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.DEBUG for r in records)


def test_the_fields_serialize_to_one_json_line(
    rel: Reliable, caplog: pytest.LogCaptureFixture
) -> None:
    """What a JSON log formatter would write: every field is JSON as it is."""

    @rel.task
    def noop() -> None:
        pass

    handle = noop.enqueue()
    with caplog.at_level(logging.DEBUG, logger="reliable.attempts"):
        rel.run_until_idle()
    [_, ended] = attempt_records(caplog)
    fields = ("job_id", "task", "attempt", "event", "outcome", "duration")
    line = json.loads(json.dumps({name: getattr(ended, name) for name in fields}))
    assert line["job_id"] == handle.id and line["outcome"] == "succeeded"


def test_attempt_lines_stay_out_of_the_default_info_output(
    rel: Reliable, caplog: pytest.LogCaptureFixture
) -> None:
    """At the default level (INFO) a busy worker does not print two lines per job; the
    failures (issue 24) are logged as before."""

    @rel.task
    def quiet() -> None:
        pass

    quiet.enqueue()
    with caplog.at_level(logging.INFO, logger="reliable"):
        rel.run_until_idle()
    assert attempt_records(caplog) == []
