"""What operators see of flow control: slots in use, rate-limit windows, throttles."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Connection,
    func,
    select,
)

from .schema import (
    concurrency,
    rate_events,
    rate_limits,
)
from .schema import throttles as throttle_table


def _split(scope: str) -> tuple[str, str, str]:
    task, option, key = [*scope.split("#", 2), "", ""][:3]
    return task, option, key


def state(connection: Connection, now: float) -> dict[str, list[dict[str, Any]]]:
    """Slots in use per concurrency scope, and each rate-limit window, for operators."""
    slots = [
        {
            "task": _split(row.scope)[0],
            "option": _split(row.scope)[1],
            "key": _split(row.scope)[2],
            "in_use": int(row.in_use),
            "limit": int(row.capacity),
        }
        for row in connection.execute(select(concurrency).order_by(concurrency.c.scope))
    ]
    windows = []
    for row in connection.execute(select(rate_limits).order_by(rate_limits.c.scope)):
        start = now - float(row.period_seconds)
        used, oldest = connection.execute(
            select(func.count(), func.min(rate_events.c.admitted_at)).where(
                rate_events.c.scope == row.scope, rate_events.c.admitted_at > start
            )
        ).one()
        task, option, key = _split(row.scope)
        windows.append(
            {
                "task": task,
                "option": option,
                "key": key,
                "limit": int(row.limit),
                "period": float(row.period_seconds),
                "used": int(used),
                "reset": 0.0 if oldest is None else float(oldest) - start,
            }
        )
    throttled = [
        {
            "task": _split(row.scope)[0],
            "option": _split(row.scope)[1],
            "key": _split(row.scope)[2],
            "next_start_in": max(0.0, float(row.next_at) - now),
        }
        for row in connection.execute(select(throttle_table).order_by(throttle_table.c.scope))
    ]
    return {"concurrency": slots, "rate_limits": windows, "throttles": throttled}
