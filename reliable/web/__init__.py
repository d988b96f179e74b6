"""The framework-neutral half of offloaded routes: snapshots, HTTP decisions, documents.

``reliable.integrations.flask`` and ``.starlette`` translate between their framework
and these pieces; a third framework costs one small module.
"""

from .http import HttpResponse, accepted, problem, status_document, too_large
from .idempotency import InvalidIdempotencyKey, parse_idempotency_key, request_fingerprint
from .routes import RouteOptions, RouteTask, admit
from .snapshot import CREDENTIAL_HEADERS, RequestSnapshot
from .status import cancel_job, job_status, job_status_async, parse_wait

__all__ = [
    "CREDENTIAL_HEADERS",
    "HttpResponse",
    "InvalidIdempotencyKey",
    "RequestSnapshot",
    "RouteOptions",
    "RouteTask",
    "accepted",
    "admit",
    "cancel_job",
    "job_status",
    "job_status_async",
    "parse_idempotency_key",
    "parse_wait",
    "problem",
    "request_fingerprint",
    "status_document",
    "too_large",
]
