"""``make test`` on a fresh machine: the PostgreSQL tests find a local server on their
own, and when there is none the run says how many were skipped and how to run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LOCAL_POSTGRES, POSTGRES_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
ONE_TEST = "tests/test_leases.py::test_heartbeat_keeps_the_lease"


def run_pytest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", ONE_TEST],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )


def without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


@pytest.mark.slow
def test_without_the_variable_the_local_server_is_used(postgres_url: str) -> None:
    if not postgres_url.startswith(LOCAL_POSTGRES):
        pytest.skip(f"the PostgreSQL of this run is not the local default {LOCAL_POSTGRES}")
    done = run_pytest(without(POSTGRES_ENV, "CI"))
    assert done.returncode == 0, done.stdout
    assert "2 passed" in done.stdout, done.stdout


@pytest.mark.slow
def test_without_a_server_the_run_says_how_many_were_skipped_and_why() -> None:
    env = {**without("CI"), POSTGRES_ENV: "postgresql://postgres@127.0.0.1:9/reliable_test"}
    done = run_pytest(env)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped" in done.stdout, done.stdout
    assert "1 PostgreSQL tests were skipped: PostgreSQL at" in done.stdout
    assert f"point {POSTGRES_ENV} at one" in done.stdout


@pytest.mark.slow
def test_in_ci_an_unusable_server_fails_the_run() -> None:
    env = {**os.environ, "CI": "true", POSTGRES_ENV: "postgresql://postgres@127.0.0.1:9/x"}
    done = run_pytest(env)
    assert done.returncode != 0
    assert "is not usable" in done.stdout
