"""Flow-control options: concurrency caps, rate limits, throttles, debouncing, and their keys.

These are small, validated, immutable objects; the store enforces them. A key is a
callable or a spec string, resolved when a job is enqueued and stored with it:

- ``"arg:user_id"``: an argument of the task (by name, positional or keyword);
- ``"header:X-Tenant"``, ``"path:account_id"``, ``"json:customer.id"``, ``"ip"``:
  parts of the request of an offloaded route.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .durations import Duration, parse_duration
from .errors import ConfigError, ReliableError
from .store.records import DebounceCheck, RateCheck

KeyFunction = Callable[..., Any]
Key = str | KeyFunction
# At most 18 digits a number: a longer one is no rate, and Python refuses to read it.
_RATE = re.compile(r"^\s*(\d{1,18})\s*/\s*(\d{1,18}(?:\.\d{0,18})?|\.\d{1,18})?\s*([a-z]+)\s*$")
_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
REQUEST_KEY_KINDS = ("header", "path", "json")
_UNSTORABLE = re.compile("[\ud800-\udfff]")
MAX_KEY_VALUE_LENGTH = 200


class MissingKey(ReliableError, LookupError):
    """A limit's key has no value for this call (no such header, argument or field)."""

    def __init__(self, spec: str, option: str) -> None:
        super().__init__(f"the {option} key {spec!r} has no value in this call")
        self.spec = spec
        self.option = option


def parse_rate(text: str, *, name: str) -> tuple[int, float]:
    """``"100/minute"``, ``"5/s"``, ``"10/30s"`` → (count, period in seconds)."""
    if not isinstance(text, str):
        raise ConfigError(name, f"expected 'N/period' such as '100/minute', got {text!r}")
    match = _RATE.match(text.lower())
    if match is None:
        raise ConfigError(name, f"expected 'N/period' such as '100/minute', got {text!r}")
    count, multiple, unit = int(match.group(1)), match.group(2), match.group(3)
    unit = unit[:-1] if unit.endswith("s") and unit[:-1] in _PERIODS else unit
    if unit not in _PERIODS:
        raise ConfigError(name, f"unknown period {match.group(3)!r} in {text!r}")
    period = float(multiple or 1) * _PERIODS[unit]
    if count < 1 or period <= 0:
        raise ConfigError(name, f"a rate needs N >= 1 and a period > 0, got {text!r}")
    return count, period


def check_key(key: Key | None, *, option: str, fn: Callable[..., Any], route: bool) -> None:
    """Validate a key spec when the decorator runs; raises ``ConfigError`` naming it.

    Request keys (``header:``, ``path:``, ``json:``, ``ip``) are for offloaded routes.
    """
    if key is None or callable(key):
        return
    if not isinstance(key, str):
        raise ConfigError(option, f"a key is a function or a spec string, got {key!r}")
    kind, _, detail = key.partition(":")
    if (kind == "ip" and not detail) or (kind in REQUEST_KEY_KINDS and detail):
        if not route:
            raise ConfigError(option, f"key {key!r} reads a request; tasks use 'arg:NAME'")
        return
    if kind == "arg" and detail and route:
        return
    if kind == "arg" and detail:
        parameters = inspect.signature(fn).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if detail not in parameters and not accepts_any:
            raise ConfigError(option, f"key {key!r}: {fn.__name__} has no argument {detail!r}")
        return
    raise ConfigError(
        option,
        f"unknown key spec {key!r}: use 'arg:NAME', 'header:NAME', 'path:NAME', "
        "'json:a.b', 'ip', or a function",
    )


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` attempts running at once, per value of ``key`` (or in all)."""

    limit: int
    key: Key | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ConfigError("concurrency", f"expected a whole number >= 1, got {self.limit!r}")


@dataclass(frozen=True)
class RateLimit:
    """Admit at most ``limit`` calls per ``per`` seconds per key value; refuse the rest.

    ``per`` takes seconds, a ``timedelta`` or ``"1m"``. Counted over a sliding window.
    """

    limit: int
    per: Duration = 60.0
    key: Key | None = None

    @property
    def period(self) -> float:
        return parse_duration(self.per, name="rate_limit")

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ConfigError("rate_limit", f"expected a whole number >= 1, got {self.limit!r}")
        if self.period <= 0:
            raise ConfigError("rate_limit", "the period must be > 0")

    @classmethod
    def parse(cls, text: str, key: Key | None = None, *, name: str = "rate_limit") -> RateLimit:
        count, period = parse_rate(text, name=name)
        return cls(count, period, key)

    def describe(self) -> str:
        return f"{self.limit}/{self.period:g}s"


@dataclass(frozen=True)
class Throttle:
    """Accept every call; start no more than ``limit`` per ``per`` seconds per key value."""

    limit: int
    per: Duration = 60.0
    key: Key | None = None

    @property
    def period(self) -> float:
        return parse_duration(self.per, name="throttle")

    @property
    def interval(self) -> float:
        return self.period / self.limit

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 1:
            raise ConfigError("throttle", f"expected a whole number >= 1, got {self.limit!r}")
        if self.period <= 0:
            raise ConfigError("throttle", "the period must be > 0")

    @classmethod
    def parse(cls, text: str, key: Key | None = None, *, name: str = "throttle") -> Throttle:
        count, period = parse_rate(text, name=name)
        return cls(count, period, key)


@dataclass(frozen=True)
class Debounce:
    """Calls with one key value within ``window`` collapse into one run, the latest.

    ``max_wait`` bounds how long a steady stream of calls can postpone that run.
    """

    window: Duration
    key: Key | None = None
    max_wait: Duration | None = None

    @property
    def window_seconds(self) -> float:
        return parse_duration(self.window, name="debounce")

    @property
    def max_wait_seconds(self) -> float | None:
        return None if self.max_wait is None else parse_duration(self.max_wait, name="max_wait")

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ConfigError("debounce", "the window must be > 0")
        limit = self.max_wait_seconds
        if limit is not None and limit < self.window_seconds:
            raise ConfigError("max_wait", "max_wait must be at least the debounce window")


ConcurrencyOption = int | Concurrency | Sequence[int | Concurrency]
RateOption = str | RateLimit | Sequence[str | RateLimit]


@dataclass(frozen=True)
class FlowOptions:
    """A task's flow control, normalised: every option an object, every key checked."""

    concurrency: tuple[Concurrency, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    throttle: Throttle | None = None
    debounce: Debounce | None = None

    @property
    def limited_at_claim(self) -> bool:
        return bool(self.concurrency) or self.throttle is not None

    @property
    def empty(self) -> bool:
        return not (self.concurrency or self.rate_limits or self.throttle or self.debounce)

    @classmethod
    def build(
        cls,
        fn: Callable[..., Any],
        *,
        route: bool,
        concurrency: ConcurrencyOption | None = None,
        rate_limit: RateOption | None = None,
        throttle: str | Throttle | None = None,
        debounce: Duration | Debounce | None = None,
        key: Key | None = None,
        max_wait: Duration | None = None,
    ) -> FlowOptions:
        """Normalise the options; ``key`` is the key of those given in short form."""
        caps: list[Concurrency] = []
        for item in _as_list(concurrency):
            if isinstance(item, Concurrency):
                caps.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                caps.append(Concurrency(item, key))
            else:
                raise ConfigError(
                    "concurrency", f"expected N or Concurrency(N, key=...), got {item!r}"
                )
        rates: list[RateLimit] = []
        for item in _as_list(rate_limit):
            if isinstance(item, RateLimit):
                rates.append(item)
            elif isinstance(item, str):
                rates.append(RateLimit.parse(item, key))
            else:
                raise ConfigError(
                    "rate_limit", f"expected 'N/period' or RateLimit(...), got {item!r}"
                )
        throttled = Throttle.parse(throttle, key) if isinstance(throttle, str) else throttle
        if throttled is not None and not isinstance(throttled, Throttle):
            raise ConfigError("throttle", f"expected 'N/period' or Throttle(...), got {throttle!r}")
        debounced: Debounce | None
        if debounce is None or isinstance(debounce, Debounce):
            debounced = debounce
            if max_wait is not None and debounced is None:
                raise ConfigError("max_wait", "max_wait goes with debounce=")
        else:
            debounced = Debounce(debounce, key, max_wait)
        options = cls(tuple(caps), tuple(rates), throttled, debounced)
        for option, limit_key in options.limit_keys():
            check_key(limit_key, option=option, fn=fn, route=route)
        return options

    def limit_keys(self) -> list[tuple[str, Key | None]]:
        """(option name, key) of every limit, in a fixed order."""
        found: list[tuple[str, Key | None]] = []
        found += [(f"concurrency{i}", cap.key) for i, cap in enumerate(self.concurrency)]
        found += [(f"rate_limit{i}", rate.key) for i, rate in enumerate(self.rate_limits)]
        if self.throttle is not None:
            found.append(("throttle", self.throttle.key))
        if self.debounce is not None:
            found.append(("debounce", self.debounce.key))
        return found


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def scope_value(value: object) -> str:
    """A key value as stored in a scope name: short values as they are, long ones hashed,
    and so are those a database cannot store as text (a NUL, a lone surrogate)."""
    text = str(value)
    if len(text) <= 64 and (text.isascii() or not _UNSTORABLE.search(text)) and "\0" not in text:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def describe_key(key: Key | None) -> str:
    if key is None:
        return "*"
    return key if isinstance(key, str) else getattr(key, "__name__", "key")


def resolve_call_key(
    key: Key, option: str, fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> str:
    """The value of ``key`` for a task called with ``args`` and ``kwargs``."""
    if callable(key):
        value = key(*args, **kwargs)
    else:
        name = key.partition(":")[2]
        try:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise MissingKey(key, option) from exc
        bound.apply_defaults()
        if name in bound.arguments:
            value = bound.arguments[name]
        else:
            value = next(
                (
                    v.get(name)
                    for v in bound.arguments.values()
                    if isinstance(v, dict) and name in v
                ),
                None,
            )
    if value is None or value == "":
        raise MissingKey(describe_key(key), option)
    return scope_value(value)


@dataclass(frozen=True)
class CancelOn:
    """An event that cancels the job when it is sent (``Reliable.send_event``).

    ``match`` maps paths in the event's data (``"order.id"``) to keys of the call
    (``"arg:order_id"``; for routes also ``"path:..."``, ``"json:..."``, ``"header:..."``;
    or a function), resolved when the job is enqueued: only an event whose data has
    those values (compared as text, up to 64 characters) cancels it.
    """

    event: str
    match: Mapping[str, Key] = field(default_factory=dict)

    @classmethod
    def build(
        cls, value: str | CancelOn | None, fn: Callable[..., Any], *, route: bool
    ) -> CancelOn | None:
        """Check ``cancel_on=`` when the decorator runs; raises ``ConfigError``."""
        if value is None:
            return None
        found = cls(value) if isinstance(value, str) else value
        if not isinstance(found, CancelOn):
            raise ConfigError(
                "cancel_on", f"expected an event name or CancelOn(...), got {value!r}"
            )
        if not isinstance(found.event, str) or not 0 < len(found.event) <= 200:
            raise ConfigError("cancel_on", f"an event name is 1 to 200 characters: {found.event!r}")
        for path, key in found.match.items():
            if not isinstance(path, str) or not path:
                raise ConfigError("cancel_on", f"a match path is a non-empty string: {path!r}")
            check_key(key, option="cancel_on", fn=fn, route=route)
        return found

    def resolve(self, resolve: Resolver) -> tuple[str, str | None]:
        """The event and its match (JSON text) for one call."""
        match = {path: resolve(key, "cancel_on") for path, key in self.match.items()}
        return self.event, json.dumps(match, separators=(",", ":")) if match else None


@dataclass(frozen=True)
class FlowPlan:
    """What the store must enforce for one new job, with its keys resolved (the event
    that cancels it included)."""

    limits: str | None = None
    rate_limits: tuple[RateCheck, ...] = ()
    debounce: DebounceCheck | None = None
    cancel_on: str | None = None
    cancel_match: str | None = None


Resolver = Callable[[Key, str], str]


def plan(
    task: str, flow: FlowOptions, resolve: Resolver, cancel_on: CancelOn | None = None
) -> FlowPlan:
    """Resolve every key of ``flow`` (and of ``cancel_on``) for one call and name the
    scopes it counts in."""
    if cancel_on is not None:
        event, match = cancel_on.resolve(resolve)
        return replace(plan(task, flow, resolve), cancel_on=event, cancel_match=match)
    if flow.empty:
        return FlowPlan()
    keys: dict[str, str] = {}

    def scope(option: str, key: Key | None) -> str:
        value = ""
        if key is not None:
            value = keys[option] = resolve(key, option)
        return f"{task}#{option}#{value}"

    caps = [[scope(f"concurrency{i}", c.key), c.limit] for i, c in enumerate(flow.concurrency)]
    rates = tuple(
        RateCheck(scope(f"rate_limit{i}", r.key), r.limit, r.period)
        for i, r in enumerate(flow.rate_limits)
    )
    document: dict[str, Any] = {"keys": keys}
    if caps:
        document["concurrency"] = caps
    if flow.throttle is not None:
        document["throttle"] = [scope("throttle", flow.throttle.key), flow.throttle.interval]
    debounce = None
    if flow.debounce is not None:
        debounce = DebounceCheck(
            scope("debounce", flow.debounce.key),
            flow.debounce.window_seconds,
            flow.debounce.max_wait_seconds,
        )
    return FlowPlan(
        limits=json.dumps(document, separators=(",", ":")),
        rate_limits=rates,
        debounce=debounce,
    )
