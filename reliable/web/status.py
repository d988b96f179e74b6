"""The status resource ``{prefix}/jobs/<id>``: GET (with ``?wait=N``) and DELETE."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from ..errors import JobNotFound
from ..jobs import JobInfo
from ..runtime import Runtime
from .http import HttpResponse, problem, status_document

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_WAIT_SECONDS = 60.0


# Decides whether the caller may ``read`` or ``cancel`` the job: built by an integration
# around the application's hook (see ``Reliable.status_access``).
Allow = Callable[[JobInfo, str], bool]


def not_found(job_id: str) -> HttpResponse:
    return problem(404, f"no job with id {job_id!r}")


def forbidden(job_id: str, action: str) -> HttpResponse:
    return problem(403, f"you may not {action} job {job_id}", title="Forbidden")


def parse_wait(raw: str | None) -> float | HttpResponse:
    """``?wait=N`` as seconds (capped at 60), or a 400 problem for a bad value."""
    if raw is None or raw == "":
        return 0.0
    try:
        seconds = float(raw)
    except ValueError:
        return problem(400, f"wait must be a number of seconds, got {raw!r}")
    if not seconds >= 0:
        return problem(400, f"wait must be >= 0, got {raw!r}")
    return min(seconds, MAX_WAIT_SECONDS)


def _lookup(runtime: Runtime, job_id: str) -> JobInfo | None:
    if not JOB_ID.match(job_id):
        return None
    try:
        return runtime.get_job(job_id)
    except JobNotFound:
        return None


def job_status(
    runtime: Runtime, job_id: str, wait: float = 0.0, allow: Allow | None = None
) -> HttpResponse:
    """The job's status document, after waiting up to ``wait`` s for a terminal state;
    403 when ``allow`` refuses the caller."""
    info = _lookup(runtime, job_id)
    if info is None:
        return not_found(job_id)
    if allow is not None and not allow(info, "read"):
        return forbidden(job_id, "read")
    if wait > 0 and not info.finished:
        deadline = time.monotonic() + wait
        pause = 0.01
        while not info.finished and (remaining := deadline - time.monotonic()) > 0:
            runtime.store.wait_for_change(min(pause, remaining))
            pause = min(pause * 2, 0.25)
            info = runtime.get_job(job_id)
    return HttpResponse.json(200, status_document(info, runtime.settings.redact_headers))


async def job_status_async(
    runtime: Runtime, job_id: str, wait: float = 0.0, allow: Allow | None = None
) -> HttpResponse:
    """``job_status`` for event loops: the database is read (and ``allow`` asked) in a
    thread, waits are async."""
    info = await asyncio.to_thread(_lookup, runtime, job_id)
    if info is None:
        return not_found(job_id)
    if allow is not None and not await asyncio.to_thread(allow, info, "read"):
        return forbidden(job_id, "read")
    deadline = time.monotonic() + wait
    pause = 0.01
    while not info.finished and (remaining := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.25)
        info = await asyncio.to_thread(runtime.get_job, job_id)
    return HttpResponse.json(200, status_document(info, runtime.settings.redact_headers))


def cancel_job(runtime: Runtime, job_id: str, allow: Allow | None = None) -> HttpResponse:
    """DELETE: cancel a job that has not finished; 409 if it already had, 403 when
    ``allow`` refuses the caller."""
    info = _lookup(runtime, job_id)
    if info is None:
        return not_found(job_id)
    if allow is not None and not allow(info, "cancel"):
        return forbidden(job_id, "cancel")
    if not runtime.cancel(job_id):
        return problem(409, f"job {job_id} has already finished ({info.status})", title="Conflict")
    document = status_document(runtime.get_job(job_id), runtime.settings.redact_headers)
    return HttpResponse.json(200, document)
