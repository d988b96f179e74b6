"""What the ``reliable`` command prints: tables for people, JSON for scripts, and the
exit codes (0 ok, 1 error, 2 usage, 3 not found)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import click

from ..jobs import JobInfo

OK = 0
ERROR = 1  # the command could not do its work (the database failed, an aborted prompt)
USAGE = 2  # a bad option, argument, setting or application target
NOT_FOUND = 3  # no job with that id


def when(value: datetime | None) -> str:
    """A time for a table: UTC, to the second."""
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def brief_error(error: dict[str, Any] | None, width: int = 60) -> str:
    if not error:
        return ""
    text = f"{error.get('type')}: {error.get('message')}"
    return text if len(text) <= width else text[: width - 3] + "..."


def job_document(info: JobInfo) -> dict[str, Any]:
    """A job as JSON: every field of ``JobInfo``, times in ISO 8601."""
    document: dict[str, Any] = {}
    for name in info.__dataclass_fields__:
        value = getattr(info, name)
        document[name] = value.isoformat() if isinstance(value, datetime) else value
    return document


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, a header line on top."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]  # fmt: skip
    return "\n".join(lines)


def emit_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def job_rows(jobs: Sequence[JobInfo]) -> list[list[object]]:
    return [
        [
            info.id,
            info.task,
            info.status + (" (no worker knows its task)" if info.task_unknown else ""),
            info.queue,
            info.attempts,
            when(info.created_at),
            brief_error(info.error),
        ]
        for info in jobs
    ]


JOB_HEADERS = ("ID", "TASK", "STATUS", "QUEUE", "ATTEMPTS", "CREATED (UTC)", "LAST ERROR")
