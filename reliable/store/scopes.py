"""A job's limits document, parsed: the scopes of its concurrency caps, its throttle, its
slot group and key values. Pure functions, cached: jobs of one task and key share one."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """A job's limits document, parsed: its caps (scope, capacity), its throttle
    (scope, interval), its slot group: the name of the set of scopes it counts against
    (None if uncapped), and the values of its keys (option, value)."""

    caps: tuple[tuple[str, int], ...]
    throttle: tuple[str, float] | None
    group: str | None
    keys: tuple[tuple[str, str], ...] = ()

    @functools.cached_property
    def scopes(self) -> tuple[str, ...]:
        """The scopes of its caps."""
        return tuple(scope for scope, _ in self.caps)


@functools.lru_cache(maxsize=4096)
def parse(document: str) -> Limits:
    """Parse a limits document (JSON); jobs of one task and key share one, so the
    result is cached."""
    limits = json.loads(document)
    caps = tuple((str(scope), int(capacity)) for scope, capacity in limits.get("concurrency", ()))
    throttle = limits.get("throttle")
    return Limits(
        caps,
        (str(throttle[0]), float(throttle[1])) if throttle else None,
        json.dumps([scope for scope, _ in caps], separators=(",", ":")) if caps else None,
        tuple((str(option), str(value)) for option, value in limits.get("keys", {}).items()),
    )


@functools.lru_cache(maxsize=4096)
def group_scopes(group: str) -> tuple[str, ...]:
    return tuple(json.loads(group))


def slots_of(held: Sequence[str | None]) -> dict[str, int]:
    """Slots per scope held by attempts whose jobs' limits JSON are ``held``."""
    slots: dict[str, int] = {}
    for document in held:
        if document:
            for scope in parse(document).scopes:
                slots[scope] = slots.get(scope, 0) + 1
    return slots


def kept_scopes(kept: Sequence[str | None]) -> list[str]:
    """The scopes of the slots whose limits JSON are ``kept``, in lock order."""
    return sorted(slots_of(kept))
