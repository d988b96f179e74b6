"""The framework-neutral half of offloaded routes: snapshots, HTTP decisions, documents.

``reliable.integrations.flask`` and ``.starlette`` translate between their framework
and these pieces; a third framework costs one small module.
"""

from .http import HttpResponse, accepted, problem, status_document
from .idempotency import InvalidIdempotencyKey, parse_idempotency_key, request_fingerprint
from .routes import RouteOptions, RouteTask, admit
from .snapshot import CREDENTIAL_HEADERS, RequestSnapshot

__all__ = [
    "CREDENTIAL_HEADERS",
    "HttpResponse",
    "InvalidIdempotencyKey",
    "RequestSnapshot",
    "RouteOptions",
    "RouteTask",
    "accepted",
    "admit",
    "parse_idempotency_key",
    "problem",
    "request_fingerprint",
    "status_document",
]
