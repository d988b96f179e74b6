"""HTTP answers decided by the core: 202 Accepted, problem+json, the job status document."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..jobs import JobInfo
from .snapshot import hidden_headers


@dataclass
class HttpResponse:
    """A framework-neutral response; the integrations turn it into their own."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def json(
        cls,
        status: int,
        document: Any,
        *,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
    ) -> HttpResponse:
        body = json.dumps(document, separators=(",", ":"), default=str).encode()
        return cls(status, [("content-type", content_type), *(headers or [])], body)


PROBLEM_TITLES = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    **extra: Any,
) -> HttpResponse:
    """An RFC 9457 ``application/problem+json`` response."""
    document = {
        "type": "about:blank",
        "title": title or PROBLEM_TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extra,
    }
    return HttpResponse.json(
        status, document, content_type="application/problem+json", headers=headers
    )


# How long a client is told to wait before trying again when the job store failed.
UNAVAILABLE_RETRY_SECONDS = 5


def unavailable(detail: str) -> HttpResponse:
    """503 with ``Retry-After``: the job store failed (down, read-only, full). ``detail``
    is for the client: the database's own message stays in the server's log."""
    headers = [("retry-after", str(UNAVAILABLE_RETRY_SECONDS))]
    return problem(503, detail, headers=headers, retry_after=UNAVAILABLE_RETRY_SECONDS)


def too_large(limit: int) -> HttpResponse:
    """413: the body is larger than ``RELIABLE_MAX_PAYLOAD``; nothing was stored."""
    return problem(413, f"the request body is larger than {limit} bytes")


def status_url(prefix: str, job_id: str) -> str:
    return f"{prefix}/jobs/{job_id}"


def accepted(
    job_id: str, prefix: str, *, replayed: bool = False, status: str = "queued"
) -> HttpResponse:
    """``202 Accepted`` pointing at the job's status resource (SPEC §4); a replay says
    the job's status as it is now."""
    url = status_url(prefix, job_id)
    headers = [("location", url), ("retry-after", "1")]
    if replayed:
        headers.append(("idempotent-replayed", "true"))
    return HttpResponse.json(
        202, {"id": job_id, "status": status, "status_url": url}, headers=headers
    )


def _iso(info_time: Any) -> str | None:
    return None if info_time is None else info_time.isoformat()


# Response headers of a handler that are neither stored with its result nor served
# from one stored by an earlier version: a session the handler opened belongs to no
# one who polls the job. The credential headers and RELIABLE_REDACT_HEADERS go too.
SECRET_RESPONSE_HEADERS = frozenset({"set-cookie"})


def served_result(result: Any, redact: Iterable[str] = ()) -> Any:
    """A handler's stored result as served: without ``Set-Cookie``, the credential
    headers and the ``redact`` header names (``RELIABLE_REDACT_HEADERS``)."""
    if not (
        isinstance(result, dict)
        and "status_code" in result
        and isinstance(result.get("headers"), dict)
    ):
        return result
    hidden = SECRET_RESPONSE_HEADERS | hidden_headers(redact)
    headers = {k: v for k, v in result["headers"].items() if str(k).lower() not in hidden}
    return {**result, "headers": headers}


def status_document(info: JobInfo, redact: Iterable[str] = ()) -> dict[str, Any]:
    """The status resource's body: id, task, status, attempts, times, result, error.

    A handler's response headers in the result go without ``Set-Cookie``, the
    credential headers and the ``redact`` header names (``RELIABLE_REDACT_HEADERS``).
    """
    error = info.error
    if error is not None:
        error = {k: v for k, v in error.items() if k != "traceback"}
    return {
        "id": info.id,
        "task": info.task,
        "status": info.status,
        "attempts": info.attempts,
        "created_at": _iso(info.created_at),
        "started_at": _iso(info.started_at),
        "finished_at": _iso(info.finished_at),
        "result": served_result(info.result, redact) if info.status == "succeeded" else None,
        # The last failed attempt's error, also while the job is retried.
        "error": error if info.status != "succeeded" else None,
    }
