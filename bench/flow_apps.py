"""Applications for ``python -m bench.flow``: one per case, chosen by BENCH_FLOW_CASE.

Each case registers only its own task, so the uncapped case measures the plain claim
path (a worker claims with limits only when a task it runs has a cap or a throttle).
"""

from __future__ import annotations

import os

from reliable import Concurrency, Reliable

CASES = ("uncapped", "concurrency=4", "per-key cap (100 keys)", "rate limit")


def build(case: str, database_url: str | None = None) -> Reliable:
    """The application of ``case`` on ``database_url`` (default: RELIABLE_DATABASE_URL)."""
    app = Reliable(database_url=database_url)
    if case == "uncapped":

        @app.task(name="work")
        def plain(key: str, i: int) -> None: ...

    elif case == "concurrency=4":

        @app.task(name="work", concurrency=4)
        def capped(key: str, i: int) -> None: ...

    elif case == "per-key cap (100 keys)":

        @app.task(name="work", concurrency=Concurrency(1, key="arg:key"))
        def keyed(key: str, i: int) -> None: ...

    elif case == "rate limit":

        @app.task(name="work", rate_limit="1000000/minute")
        def limited(key: str, i: int) -> None: ...

    else:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
    return app


rel = build(os.environ.get("BENCH_FLOW_CASE", "uncapped"))
