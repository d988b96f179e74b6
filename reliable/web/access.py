"""Who may see the dashboard and the metrics, and act on jobs from the dashboard.

With no token set (``RELIABLE_DASHBOARD_TOKEN``), only a client on the loopback
interface is let in: a dashboard is never open to the network without a token. With a
token, a request must carry it: ``Authorization: Bearer <token>``, or the session cookie
that the dashboard's login form sets (an HMAC of the token, never the token itself).
``RELIABLE_DASHBOARD_READ_TOKEN`` grants reading without acting. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from enum import IntEnum

from ..settings import Settings

SESSION_COOKIE = "reliable_session"


class Grant(IntEnum):
    """What a request may do: nothing, read, or read and act."""

    NONE = 0
    READ = 1
    WRITE = 2


def session_value(token: str) -> str:
    """The cookie value that stands for ``token``: an HMAC of it, so the cookie never
    holds the token itself."""
    return hmac.new(token.encode(), b"reliable-dashboard-session", hashlib.sha256).hexdigest()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _matches(offered: str | None, expected: str | None) -> bool:
    return (
        offered is not None
        and expected is not None
        and hmac.compare_digest(offered.encode(), expected.encode())
    )


def grant(
    settings: Settings,
    client_host: str | None,
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
) -> Grant:
    """What a request may do. ``headers`` are keyed in lower case."""
    write, read = settings.dashboard_token, settings.dashboard_read_token
    if write is None and read is None:
        return Grant.WRITE if is_loopback(client_host) else Grant.NONE
    bearer = None
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        bearer = authorization[7:].strip()
    session = cookies.get(SESSION_COOKIE)
    for token, level in ((write, Grant.WRITE), (read, Grant.READ)):
        if token is not None and (
            _matches(bearer, token) or _matches(session, session_value(token))
        ):
            return level
    return Grant.NONE


def login(settings: Settings, offered: str) -> str | None:
    """The session cookie value for a token typed into the login form, or ``None``."""
    for token in (settings.dashboard_token, settings.dashboard_read_token):
        if token is not None and _matches(offered, token):
            return session_value(token)
    return None
