"""What keeps the dashboard safe in a browser: the CSRF check, the cookies it sets and
the headers on every answer (a strict Content-Security-Policy among them).

An action (every ``POST``) must carry, in its form, the value of the ``reliable_csrf``
cookie that the dashboard set on the page holding the form (a double-submit token: a
page of another site can neither read the cookie nor, ``SameSite=Strict``, have it
sent). When the browser says where the request comes from (``Sec-Fetch-Site``,
``Origin``), it must be this site.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

from .request import ConsoleRequest, first

CSRF_COOKIE = "reliable_csrf"
CSRF_FIELD = "csrf"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
]


def csrf_token(request: ConsoleRequest) -> tuple[str, bool]:
    """The request's CSRF token, and whether it is new (then the answer sets it)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    if len(current) >= 32:
        return current, False
    return secrets.token_urlsafe(32), True


def csrf_refusal(request: ConsoleRequest, form: Mapping[str, list[str]]) -> str | None:
    """Why an action is refused as possibly forged, or ``None`` when it is not."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"the action came from another site (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            return "the action came from another origin"
    cookie = request.cookies.get(CSRF_COOKIE, "")
    offered = first(form, CSRF_FIELD)
    if not cookie or not offered or not hmac.compare_digest(cookie.encode(), offered.encode()):
        return "the form's CSRF token is missing or does not match: reload the page and try again"
    return None


def set_cookie(
    name: str, value: str, path: str, *, secure: bool, max_age: int | None = None
) -> tuple[str, str]:
    """A ``Set-Cookie`` header: HttpOnly, SameSite=Strict, Secure over HTTPS."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return ("set-cookie", "; ".join(parts))
