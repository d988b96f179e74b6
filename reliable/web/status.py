"""The status resource ``{prefix}/jobs/<id>``: GET (with ``?wait=N``) and DELETE."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec

from ..errors import JobNotFound, StoreError
from ..jobs import JobInfo
from ..runtime import Runtime
from .http import HttpResponse, problem, status_document, unavailable

log = logging.getLogger("reliable.web")
P = ParamSpec("P")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_WAIT_SECONDS = 60.0
_NUMBER = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")


# Decides whether the caller may ``read`` or ``cancel`` the job: built by an integration
# around the application's hook (see ``Reliable.status_access``).
Allow = Callable[[JobInfo, str], bool]


def _store_failed(exc: StoreError) -> HttpResponse:
    log.error("the job status resource cannot read the job store: %s", exc)
    return unavailable("the job store is unavailable; try again later")


def _answers_503(fn: Callable[P, HttpResponse]) -> Callable[P, HttpResponse]:
    """``fn``, answering 503 instead of raising when the job store fails."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            return _store_failed(exc)

    return call


def _answers_503_async(
    fn: Callable[P, Awaitable[HttpResponse]],
) -> Callable[P, Awaitable[HttpResponse]]:
    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        try:
            return await fn(*args, **kwargs)
        except StoreError as exc:
            return _store_failed(exc)

    return call


def not_found(job_id: str) -> HttpResponse:
    return problem(404, f"no job with id {job_id!r}")


def forbidden(job_id: str, action: str) -> HttpResponse:
    return problem(403, f"you may not {action} job {job_id}", title="Forbidden")


def parse_wait(raw: str | None) -> float | HttpResponse:
    """``?wait=N`` as seconds (capped at 60), or a 400 problem for a bad value.

    N is a number as JSON writes one (``2``, ``0.5``, ``1e1``); not an empty string, nor
    what only Python reads as one (``inf``, ``1_0``, `` 2 ``).
    """
    if raw is None:
        return 0.0
    if not _NUMBER.match(raw):
        return problem(400, f"wait must be a number of seconds, got {raw[:40]!r}")
    seconds = float(raw)
    if not seconds >= 0:
        return problem(400, f"wait must be >= 0, got {raw[:40]!r}")
    return min(seconds, MAX_WAIT_SECONDS)


def _lookup(runtime: Runtime, job_id: str) -> JobInfo | None:
    if not JOB_ID.match(job_id):
        return None
    try:
        return runtime.get_job(job_id)
    except JobNotFound:
        return None


@_answers_503
def job_status(
    runtime: Runtime, job_id: str, wait: float = 0.0, allow: Allow | None = None
) -> HttpResponse:
    """The job's status document, after waiting up to ``wait`` s for a terminal state;
    403 when ``allow`` refuses the caller, 503 when the job store fails."""
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


@_answers_503_async
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


@_answers_503
def cancel_job(runtime: Runtime, job_id: str, allow: Allow | None = None) -> HttpResponse:
    """DELETE: cancel a job that has not finished; 409 if it already had, 403 when
    ``allow`` refuses the caller, 503 when the job store fails."""
    info = _lookup(runtime, job_id)
    if info is None:
        return not_found(job_id)
    if allow is not None and not allow(info, "cancel"):
        return forbidden(job_id, "cancel")
    if not runtime.cancel(job_id):
        return problem(409, f"job {job_id} has already finished ({info.status})", title="Conflict")
    document = status_document(runtime.get_job(job_id), runtime.settings.redact_headers)
    return HttpResponse.json(200, document)
