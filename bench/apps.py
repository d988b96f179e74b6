"""The application that the benchmark's worker processes run.

``reliable worker bench.apps:rel`` imports this module; ``rel`` takes its database from
``RELIABLE_DATABASE_URL``. The benchmark process itself calls ``build(url)`` to get an
application with the same tasks on an explicit database.
"""

from __future__ import annotations

import time

from reliable import Reliable


def build(database_url: str | None = None) -> Reliable:
    """An application with the two benchmark tasks, on ``database_url`` (default: env)."""
    app = Reliable(database_url=database_url)

    @app.task
    def noop(i: int) -> None:
        """Do nothing: the drain benchmark measures the cost of a job, not of its work."""

    @app.task
    def stamp() -> float:
        """Return when the attempt started, so the caller can measure the wake-up."""
        return time.time()

    return app


# Opened lazily: importing this module touches no database.
rel = build()
