"""Settings come from RELIABLE_* variables; explicit arguments win; bad values name the culprit."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from reliable import ConfigError, Reliable, Settings
from reliable.durations import parse_duration


def test_defaults_without_environment() -> None:
    settings = Settings.load(environ={})
    assert settings.database_url == "sqlite:///reliable.db"
    assert settings.retries == 3
    assert settings.embedded_worker is True
    assert settings.idempotency_ttl == 86400
    assert settings.max_payload == 1024 * 1024
    assert settings.url_prefix == "/_reliable"
    assert settings.timeout is None


def test_environment_is_read_and_explicit_argument_wins() -> None:
    environ = {
        "RELIABLE_RETRIES": "7",
        "RELIABLE_TIMEOUT": "2m",
        "RELIABLE_EMBEDDED_WORKER": "0",
        "RELIABLE_REDACT_HEADERS": "X-Api-Key, X-Secret",
        "RELIABLE_URL_PREFIX": "/jobs/",
    }
    settings = Settings.load({"retries": 1}, environ=environ)
    assert settings.retries == 1
    assert settings.timeout == 120
    assert settings.embedded_worker is False
    assert settings.redact_headers == ("x-api-key", "x-secret")
    assert settings.url_prefix == "/jobs"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RELIABLE_RETRIES", "many"),
        ("RELIABLE_RETRIES", "-1"),
        ("RELIABLE_LEASE_SECONDS", "0"),
        ("RELIABLE_TIMEOUT", "soon"),
        ("RELIABLE_EMBEDDED_WORKER", "maybe"),
        ("RELIABLE_URL_PREFIX", "jobs"),
        ("RELIABLE_WORKER_THREADS", "0"),
    ],
)
def test_bad_environment_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.load(environ={variable: value})


def test_bad_variable_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RELIABLE_IDEMPOTENCY_TTL", "a day")
    with pytest.raises(ConfigError, match="RELIABLE_IDEMPOTENCY_TTL"):
        Reliable(f"sqlite:///{tmp_path / 'jobs.db'}")
    assert not (tmp_path / "jobs.db").exists()


def test_bad_explicit_argument_names_the_argument() -> None:
    with pytest.raises(ConfigError, match="retries"):
        Reliable("sqlite:///x.db", retries=-2)
    with pytest.raises(ConfigError, match="not a setting"):
        Reliable("sqlite:///x.db", retires=2)


def test_unsupported_database_url_is_refused() -> None:
    rel = Reliable("mysql://localhost/jobs")
    with pytest.raises(ConfigError, match="RELIABLE_DATABASE_URL"):
        rel.store  # noqa: B018 - opening the store parses the URL


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), ("30", 30.0), ("250ms", 0.25), ("2m", 120.0), ("1.5h", 5400.0), ("1d", 86400.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, name="x") == seconds  # type: ignore[arg-type]
    assert parse_duration(timedelta(minutes=3), name="x") == 180.0


@pytest.mark.parametrize("value", ["-1", "2 fortnights", "", -5, True, float("nan")])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        parse_duration(value, name="timeout")  # type: ignore[arg-type]
