"""Parsing of durations given as seconds, ``timedelta`` or short strings like ``"2m"``."""

from __future__ import annotations

import re
from datetime import timedelta

from .errors import ConfigError

Duration = float | int | str | timedelta

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_duration(value: Duration, *, name: str) -> float:
    """Return ``value`` in seconds.

    Accepts a non-negative number of seconds, a ``timedelta``, or a string such as
    ``"30"``, ``"250ms"``, ``"2m"``, ``"1.5h"``, ``"1d"``. Raises ``ConfigError`` naming
    ``name`` for anything else.
    """
    if isinstance(value, bool):
        raise ConfigError(name, f"expected a duration, got {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value.lower())
        if match is None or match.group(2) not in ("", *_UNITS):
            raise ConfigError(
                name, f"expected a duration such as 30, '250ms', '2m', '1h' or '1d', got {value!r}"
            )
        seconds = float(match.group(1)) * _UNITS.get(match.group(2), 1.0)
    else:
        raise ConfigError(name, f"expected a duration, got {type(value).__name__}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(name, f"a duration must be a finite number >= 0, got {value!r}")
    return seconds
