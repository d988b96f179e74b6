"""A request to the dashboard, whatever server or framework received it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

# A form larger than this is refused: the biggest one, a page of selected job ids, is
# far smaller.
MAX_FORM_BYTES = 256 * 1024


@dataclass(frozen=True)
class ConsoleRequest:
    """One HTTP request to the dashboard.

    ``path`` is relative to where the dashboard is mounted (``/`` is its overview);
    ``query`` is the raw query string; ``headers`` are keyed in lower case;
    ``client_host`` is the peer's address (loopback peers need no token when none is
    set); ``scheme`` decides whether cookies are marked ``Secure``.
    """

    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    cookies: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    client_host: str | None = None
    scheme: str = "http"

    def args(self) -> dict[str, list[str]]:
        """The query string's parameters."""
        return parse_qs(self.query, keep_blank_values=True)

    def form(self) -> dict[str, list[str]]:
        """The body's parameters, when it is an urlencoded form."""
        kind = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return {}
        return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


def parse_cookies(header: str | None) -> dict[str, str]:
    """The cookies of a ``Cookie`` header; a malformed header counts as none."""
    if not header:
        return {}
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def first(values: Mapping[str, list[str]], name: str) -> str:
    """The first value of ``name``, stripped, or the empty string."""
    found = values.get(name)
    return found[0].strip() if found else ""
