"""Cron expressions read in a time zone: when their ticks fall, as UTC epoch seconds.

Ticks are computed on the wall clock of the zone (croniter, with ``zoneinfo``), so
``"0 9 * * *"`` in ``Europe/Berlin`` is 09:00 in Berlin in winter and in summer. Where
the zone's clock jumps:

- spring forward: a tick whose wall time does not exist runs when the gap ends
  (``"30 2 * * *"`` at 03:00 on the day the clock skips from 02:00 to 03:00); ticks of
  a frequent schedule that fall in the gap are not made up (they have no instant);
- fall back: a schedule whose hour field is ``*`` ticks through both passes of the
  repeated hour (``"*/15 * * * *"`` keeps its 15 minutes of real time), and one with
  fixed hours ticks once, at the first pass (``"30 2 * * *"`` runs once that night).
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .errors import ConfigError

# Bounds the search for a tick that is not in the second pass of a repeated hour: an
# hour of ticks, for a schedule of fixed hours that ticks every second.
_MAX_SKIPPED = 3700


class Cron:
    """A cron expression (5 fields, or 6 with seconds last; ``@daily`` and the like)
    read in the zone ``tz`` (an IANA name such as ``"Europe/Berlin"``).

    Raises ``ConfigError`` naming ``cron`` for an expression croniter does not accept
    or that never matches (``"0 0 31 2 *"``), and naming ``tz`` for an unknown zone.
    """

    def __init__(self, expression: str, tz: str = "UTC") -> None:
        if not isinstance(expression, str) or not croniter.is_valid(expression):
            raise ConfigError(
                "cron", f"expected a cron expression such as '*/5 * * * *', got {expression!r}"
            )
        if not isinstance(tz, str) or not tz:
            raise ConfigError("tz", f"expected an IANA time zone name, got {tz!r}")
        try:
            self.zone: tzinfo = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                "tz", f"unknown time zone {tz!r} (an IANA name such as 'Europe/Berlin')"
            ) from None
        self.expression = expression
        self.tz = tz
        hours = croniter(expression).expanded[1]
        # Fixed hours tick once in a repeated hour; "every hour" ticks in both passes.
        self._every_hour = hours == ["*"] or len(set(hours)) == 24
        try:
            self.next_after(datetime(2000, 1, 1, tzinfo=self.zone).timestamp())
        except CroniterError:
            raise ConfigError("cron", f"{expression!r} never matches a date") from None

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}, tz={self.tz!r})"

    def local(self, instant: float) -> datetime:
        """``instant`` on the zone's wall clock (``fold`` set on a repeated hour)."""
        return datetime.fromtimestamp(instant, self.zone)

    def label(self, instant: float) -> str:
        """The tick at ``instant`` as ISO 8601 in the zone, offset included
        (``2024-10-27T02:30:00+01:00``): unique per tick, also in a repeated hour."""
        return self.local(instant).isoformat()

    def _counts(self, tick: datetime) -> bool:
        return self._every_hour or self.local(tick.timestamp()).fold == 0

    def next_after(self, instant: float) -> float:
        """The first tick strictly after ``instant``."""
        ticks = croniter(self.expression, self.local(instant))
        for _ in range(_MAX_SKIPPED):
            tick = ticks.get_next(datetime)
            if tick.timestamp() > instant and self._counts(tick):
                return float(tick.timestamp())
        raise CroniterError(f"no tick of {self.expression!r} after {self.label(instant)}")

    def latest_until(self, instant: float) -> float | None:
        """The last tick at or before ``instant`` (``None`` if croniter finds none)."""
        # A microsecond later, so that a tick at ``instant`` counts (as epoch seconds,
        # not wall time: adding a timedelta to a local time would drop its fold).
        ticks = croniter(self.expression, self.local(instant + 1e-6))
        latest = None
        try:
            for _ in range(_MAX_SKIPPED):
                tick = ticks.get_prev(datetime)
                if tick.timestamp() <= instant and self._counts(tick):
                    latest = float(tick.timestamp())
                    break
        except CroniterError:
            return None
        if latest is None:
            return None
        # Stepping back across a change of offset is where croniter is least sure:
        # step forward again from what it found, which is the order ticks are made in.
        while (following := self.next_after(latest)) <= instant:
            latest = following
        return latest

    def between(self, after: float, until: float, limit: int) -> list[float]:
        """The ticks ``t`` with ``after < t <= until``, oldest first, at most ``limit``."""
        ticks: list[float] = []
        at = after
        while len(ticks) < limit:
            at = self.next_after(at)
            if at > until:
                break
            ticks.append(at)
        return ticks
