"""Settings: every one has a ``RELIABLE_*`` environment variable; an explicit argument wins."""

from __future__ import annotations

import difflib
import os
import threading
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .durations import parse_duration
from .errors import ConfigError, ConfigWarning

PREFIX = "RELIABLE_"
# RELIABLE_TASK_<NAME>_<OPTION> are per-task overrides (see overrides.py), not settings.
TASK_PREFIX = "RELIABLE_TASK_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(name, f"expected one of 1/0, true/false, yes/no, on/off, got {value!r}")


def _int(minimum: int) -> Callable[[object, str], int]:
    def parse(value: object, name: str) -> int:
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {value!r}") from None
        if isinstance(number, bool) or number < minimum:
            raise ConfigError(name, f"expected a whole number >= {minimum}, got {value!r}")
        return number

    return parse


def _seconds(value: object, name: str) -> float:
    return parse_duration(value, name=name)  # type: ignore[arg-type]


def _positive_seconds(value: object, name: str) -> float:
    seconds = parse_duration(value, name=name)  # type: ignore[arg-type]
    if seconds <= 0:
        raise ConfigError(name, f"expected a duration > 0, got {value!r}")
    return seconds


def _optional_seconds(value: object, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "0")):
        return None
    return _positive_seconds(value, name)


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {type(value).__name__}")
    return value


def _optional_text(value: object, name: str) -> str | None:
    if value is None or value == "":
        return None
    return _text(value, name)


def _url_prefix(value: object, name: str) -> str:
    prefix = _text(value, name).rstrip("/")
    if not prefix.startswith("/"):
        raise ConfigError(name, f"must start with '/', got {value!r}")
    return prefix


def _header_names(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple | set | frozenset):
        items = [str(part).strip() for part in value]
    else:
        raise ConfigError(name, f"expected a comma-separated list, got {type(value).__name__}")
    return tuple(sorted({item.lower() for item in items if item}))


def _synchronous(value: object, name: str) -> str:
    text = _text(value, name).strip().upper()
    if text not in ("FULL", "NORMAL"):
        raise ConfigError(name, f"expected FULL or NORMAL, got {value!r}")
    return text


def _setting(default: Any, parse: Callable[[Any, str], Any]) -> Any:
    return field(default=default, metadata={"parse": parse})


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_about_misspellings(environ: Mapping[str, str], variables: Collection[str]) -> None:
    """Warn (``ConfigWarning``) about each ``RELIABLE_*`` variable in ``environ`` that is
    not one of ``variables`` but close to one, naming the closest; once per variable
    and process.

    Variables close to none (an application's own ``RELIABLE_SOMETHING``) and per-task
    overrides (``RELIABLE_TASK_*``) are left alone.
    """
    by_suffix = {variable.removeprefix(PREFIX): variable for variable in variables}
    for variable in environ:
        if (
            not variable.startswith(PREFIX)
            or variable.startswith(TASK_PREFIX)
            or variable in variables
        ):
            continue
        # Comparing without the shared prefix keeps unrelated names from looking close.
        close = difflib.get_close_matches(variable.removeprefix(PREFIX), by_suffix, n=1)
        if not close:
            continue
        with _warned_lock:
            if variable in _warned:
                continue
            _warned.add(variable)
        warnings.warn(
            f"{variable} is not a setting of reliable and is ignored; "
            f"did you mean {by_suffix[close[0]]}?",
            ConfigWarning,
            stacklevel=4,
        )


@dataclass(frozen=True)
class Settings:
    """Every setting of a ``Reliable`` instance, resolved once at construction.

    Each field ``x`` is read from the environment variable ``RELIABLE_X`` unless given
    explicitly; ``Settings.load`` raises ``ConfigError`` naming the variable (or the
    argument) whose value is bad.
    """

    database_url: str = _setting("sqlite:///reliable.db", _text)
    worker_threads: int = _setting(4, _int(1))
    async_concurrency: int = _setting(100, _int(1))
    embedded_worker: bool = _setting(True, _bool)
    retries: int = _setting(3, _int(0))
    timeout: float | None = _setting(None, _optional_seconds)
    lease_seconds: float = _setting(30.0, _positive_seconds)
    poll_interval: float = _setting(1.0, _positive_seconds)
    shutdown_grace: float = _setting(30.0, _seconds)
    idempotency_ttl: float = _setting(86400.0, _positive_seconds)
    # None (0 or "none"): finished jobs are kept until purged by hand.
    result_ttl: float | None = _setting(7 * 86400.0, _optional_seconds)
    max_payload: int = _setting(1024 * 1024, _int(0))
    url_prefix: str = _setting("/_reliable", _url_prefix)
    dashboard_token: str | None = _setting(None, _optional_text)
    dashboard_read_token: str | None = _setting(None, _optional_text)
    redact_headers: tuple[str, ...] = _setting((), _header_names)
    sqlite_synchronous: str = _setting("FULL", _synchronous)
    auto_migrate: bool = _setting(True, _bool)

    @classmethod
    def load(
        cls, explicit: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Resolve every setting: ``explicit`` (non-``None`` values) beats the environment.

        Raises ``ConfigError`` naming the argument or variable with a bad value; warns
        (``ConfigWarning``) about a ``RELIABLE_*`` variable that looks like a misspelt
        setting.
        """
        explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(explicit) - known)
        if unknown:
            raise ConfigError(unknown[0], "is not a setting of Reliable")
        warn_about_misspellings(environ, {PREFIX + name.upper() for name in known})
        values: dict[str, Any] = {}
        for f in fields(cls):
            parse = f.metadata["parse"]
            variable = PREFIX + f.name.upper()
            if f.name in explicit:
                values[f.name] = parse(explicit[f.name], f.name)
            elif variable in environ:
                values[f.name] = parse(environ[variable], variable)
        return cls(**values)
