"""SPEC §9.2, §9.3 and §9.5 under chaos: workers killed at random, PostgreSQL restarted.

Three ``reliable worker`` processes of four threads run jobs of three steps, a tenth of
them on one account capped at 2, while a killer SIGKILLs a random worker every 2 to
5 s and starts another, and PostgreSQL is restarted under load (a crash, then a clean
restart). Nothing may be lost, no stored step may run again, the cap may never be
exceeded, and the workers must go on, and LISTEN, by themselves. See ``chaos.py``.

The short versions run with the suite; the full ones (5,000 jobs, two restarts) only
with ``make soak`` (marker ``soak``, deselected by default). Each prints its report;
with ``RELIABLE_SOAK_REPORT=<folder>`` it is also written there as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from chaos import CAP, IN_CI, SoakPlan, SoakReport, restart_command, run_soak
from conftest import truncate_postgres

pytestmark = pytest.mark.slow

REPORT_ENV = "RELIABLE_SOAK_REPORT"

SHORT_POSTGRES = SoakPlan(
    jobs=500, kills_until=0.6, restarts_at=(0.7,), produce_seconds=20, probes=3, hang_seconds=240
)
SHORT_SQLITE = SoakPlan(jobs=500, produce_seconds=15, probes=3, hang_seconds=240)
FULL_POSTGRES = SoakPlan(
    jobs=5000, kills_until=0.7, restarts_at=(0.3, 0.8), produce_seconds=100, hang_seconds=900
)
FULL_SQLITE = SoakPlan(jobs=5000, produce_seconds=100, hang_seconds=900)


def publish(report: SoakReport, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Print the report (also when output is captured) and write it where asked."""
    summary = report.summary()
    problems = summary.pop("problems")
    with capsys.disabled():
        print(f"\nsoak report {name}: {json.dumps(summary)}")
        if problems:
            print("problems:\n" + "\n".join(problems))
    folder = os.environ.get(REPORT_ENV)
    if folder:
        report.write(Path(folder) / f"{name}.json")


def assert_held(report: SoakReport, plan: SoakPlan) -> None:
    """Every guarantee the soak checks, with the whole report when one fails."""
    seen = json.dumps(report.summary(), indent=1)
    assert report.kills >= 1, f"the killer killed nobody\n{seen}"
    assert (report.jobs_lost, report.duplicate_jobs, report.jobs_not_succeeded) == (0, 0, 0), seen
    assert report.results_wrong == 0, seen
    assert report.steps_stored == 3 * plan.jobs, seen
    assert (report.steps_without_execution, report.steps_run_after_stored) == (0, 0), seen
    assert report.spans_unaccounted == 0, seen
    assert report.max_overlap_any <= CAP, seen
    assert report.max_overlap_hot == CAP, f"the cap was never reached\n{seen}"
    assert len(report.latency_before_ms) == len(report.latency_after_ms) == plan.probes, seen
    assert report.problems == [], seen


def restart_or_skip(url: str) -> list[str] | str:
    """The restart command, or why there is none (a failure under CI, where it must run)."""
    command = restart_command(url)
    if isinstance(command, str) and IN_CI:
        pytest.fail(f"CI must restart PostgreSQL in the soak, but cannot: {command}")
    return command


def soak_postgres(
    plan: SoakPlan, name: str, postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate_postgres(postgres_url)
    restart = restart_or_skip(postgres_url)
    report = run_soak(plan, postgres_url, tmp_path, restart=restart)
    publish(report, name, capsys)
    assert_held(report, plan)
    if isinstance(restart, str):
        pytest.skip(f"everything but the PostgreSQL restarts held; restarts skipped: {restart}")
    assert [r.mode for r in report.restarts] == ["immediate", "fast"][: len(plan.restarts_at)]
    last = report.restarts[-1]
    # The killer had stopped: every worker lived through the last restart and went on.
    assert last.survivors == last.went_on == plan.workers, report.summary()


def soak_sqlite(
    plan: SoakPlan, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_soak(plan, f"sqlite:///{tmp_path / 'jobs.db'}", tmp_path)
    publish(report, name, capsys)
    assert_held(report, plan)


@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_short_soak_on_postgres(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """500 jobs, kills for the first half, one PostgreSQL crash-restart under load."""
    soak_postgres(SHORT_POSTGRES, "postgresql-short", postgres_url, tmp_path, capsys)


@pytest.mark.timeout(600)
def test_short_soak_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """500 jobs on one SQLite file, workers killed throughout."""
    soak_sqlite(SHORT_SQLITE, "sqlite-short", tmp_path, capsys)


@pytest.mark.soak
@pytest.mark.postgres
@pytest.mark.timeout(1800)
def test_soak_on_postgres(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """5,000 jobs, kills for most of the run, PostgreSQL crashed and restarted under load."""
    soak_postgres(FULL_POSTGRES, "postgresql", postgres_url, tmp_path, capsys)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_soak_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """5,000 jobs on one SQLite file, workers killed throughout."""
    soak_sqlite(FULL_SQLITE, "sqlite", tmp_path, capsys)
