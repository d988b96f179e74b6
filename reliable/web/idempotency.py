"""The ``Idempotency-Key`` header (draft-ietf-httpapi-idempotency-key-header)."""

from __future__ import annotations

import hashlib
import re

from ..errors import ReliableError

MAX_KEY_LENGTH = 255
# RFC 8941 sf-string: printable ASCII, with \" and \\ escapes.
_SF_STRING = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$')
# A bare token of visible characters (what most clients send).
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


class InvalidIdempotencyKey(ReliableError, ValueError):
    """The header's value is not a key of 1 to 255 visible characters."""


def parse_idempotency_key(raw: str) -> str:
    """Return the key carried by an ``Idempotency-Key`` header value.

    Accepts a structured-field string (``"abc"``) or a bare token of visible ASCII.
    Raises ``InvalidIdempotencyKey`` for an empty, over-long or control-character key.
    """
    value = raw.strip(" \t")
    match = _SF_STRING.match(value)
    if match is not None:
        key = re.sub(r"\\(.)", r"\1", match.group(1))
    elif value.startswith('"'):
        raise InvalidIdempotencyKey("the Idempotency-Key string is not well formed")
    elif _TOKEN.match(value):
        key = value
    else:
        raise InvalidIdempotencyKey("the Idempotency-Key must be 1 to 255 visible ASCII characters")
    if not key or len(key) > MAX_KEY_LENGTH or not _TOKEN.match(key.replace(" ", "!")):
        raise InvalidIdempotencyKey("the Idempotency-Key must be 1 to 255 visible characters")
    return key


def request_fingerprint(method: str, path: str, query_string: str, body: bytes) -> str:
    """A digest of what makes two requests with one key the same request."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), query_string.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()
