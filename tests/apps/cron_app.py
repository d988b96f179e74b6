"""An application with a cron schedule ticking every second, for tests that run real
worker processes against one database (``RELIABLE_DATABASE_URL``)."""

from __future__ import annotations

from reliable import Reliable

rel = Reliable()


@rel.cron("* * * * * *", catch_up="all")
def every_second() -> None:
    """Nothing to do: the test counts the jobs the ticks made."""
