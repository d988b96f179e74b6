"""Per-task settings from the environment: ``RELIABLE_TASK_<NAME>_<OPTION>``.

Operators tune a task without a deploy, e.g. ``RELIABLE_TASK_SEND_INVOICE_CONCURRENCY=4``.
The override replaces the value of the decorator's option (its first cap or rate
limit, keeping its key); a bad value fails at start-up, naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from .durations import parse_duration
from .errors import ConfigError
from .limits import Concurrency, RateLimit, Throttle, parse_rate
from .tasks import TaskOptions

OPTIONS = ("CONCURRENCY", "RATE_LIMIT", "THROTTLE", "PRIORITY", "RETRIES", "TIMEOUT")


def variable_prefix(task_name: str) -> str:
    return "RELIABLE_TASK_" + re.sub(r"[^A-Z0-9]+", "_", task_name.upper()).strip("_") + "_"


def _whole(raw: str, variable: str, minimum: int | None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(variable, f"expected a whole number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(variable, f"expected a whole number >= {minimum}, got {raw!r}")
    return value


def apply_overrides(options: TaskOptions, environ: Mapping[str, str]) -> TaskOptions:
    """``options`` with every ``RELIABLE_TASK_<NAME>_*`` variable of ``environ`` applied."""
    prefix = variable_prefix(options.name)
    found = {name: environ[prefix + name] for name in OPTIONS if prefix + name in environ}
    if not found:
        return options
    flow = options.flow
    changes: dict[str, object] = {}
    for name, raw in found.items():
        variable = prefix + name
        if name == "CONCURRENCY":
            limit = _whole(raw, variable, 1)
            caps = list(flow.concurrency) or [Concurrency(limit)]
            caps[0] = Concurrency(limit, caps[0].key)
            flow = replace(flow, concurrency=tuple(caps))
        elif name == "RATE_LIMIT":
            count, period = parse_rate(raw, name=variable)
            rates = list(flow.rate_limits) or [RateLimit(count, period)]
            rates[0] = RateLimit(count, period, rates[0].key)
            flow = replace(flow, rate_limits=tuple(rates))
        elif name == "THROTTLE":
            count, period = parse_rate(raw, name=variable)
            key = flow.throttle.key if flow.throttle is not None else None
            flow = replace(flow, throttle=Throttle(count, period, key))
        elif name == "PRIORITY":
            changes["priority"] = _whole(raw, variable, None)
        elif name == "RETRIES":
            changes["retries"] = _whole(raw, variable, 0)
        elif name == "TIMEOUT":
            seconds = parse_duration(raw, name=variable)
            if seconds <= 0:
                raise ConfigError(variable, f"expected a duration > 0, got {raw!r}")
            changes["timeout"] = seconds
    return replace(options, flow=flow, **changes)  # type: ignore[arg-type]
