"""A job's input as the dashboard shows it: credentials replaced by ``[redacted]``.

A route's stored request holds no credential headers already (they are never written
to the database); the dashboard hides them again, with ``RELIABLE_REDACT_HEADERS``,
the value the ``capture`` hook kept of the caller, and any field whose name says it
holds a secret (password, token, api key...), in arguments, bodies and query strings.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ..web.snapshot import hidden_headers

REDACTED = "[redacted]"
SECRET_WORDS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "authorization",
    "cookie",
    "credential",
    "session",
    "private_key",
)


def is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_value(value: Any) -> Any:
    """``value`` with every field named like a secret replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret(str(k)) else redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item) for item in value]
    return value


def _body(encoded: str) -> Any:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return REDACTED
    if not raw:
        return ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(raw)} bytes of binary data)"
    try:
        return redact_value(json.loads(text))
    except ValueError:
        pass
    if "=" in text and "\n" not in text:
        return _query(text)
    return text


def _query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, REDACTED if is_secret(k) else v) for k, v in pairs])


def redact_request(request: dict[str, Any], redact_headers: Iterable[str]) -> dict[str, Any]:
    """A stored request snapshot for display: headers, query and body redacted."""
    hidden = hidden_headers(redact_headers)
    shown: dict[str, Any] = {
        "method": request.get("method"),
        "path": request.get("path"),
        "query": _query(str(request.get("query_string") or "")),
        "headers": [
            [str(name), REDACTED if str(name).lower() in hidden or is_secret(str(name)) else v]
            for name, v in request.get("headers") or ()
        ],
        "body": _body(str(request.get("body") or "")),
    }
    if request.get("path_params"):
        shown["path_params"] = redact_value(request["path_params"])
    if request.get("arguments") is not None:
        shown["arguments"] = redact_value(request["arguments"])
    if request.get("withheld"):
        shown["withheld"] = list(request["withheld"])
    return shown


def redact_payload(payload: Any, redact_headers: Iterable[str]) -> Any:
    """A job's stored input for display: a task's arguments, or a route's request."""
    if isinstance(payload, dict) and isinstance(payload.get("request"), dict):
        shown = {
            "framework": payload.get("framework"),
            "request": redact_request(payload["request"], redact_headers),
        }
        if payload.get("captured") is not None:
            shown["captured"] = REDACTED
        return shown
    return redact_value(payload)
