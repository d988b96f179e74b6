"""A request as stored with its job: everything the handler needs, minus credentials."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote_plus

# Never written to the database; RELIABLE_REDACT_HEADERS adds more.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


def hidden_headers(extra: Iterable[str] = ()) -> frozenset[str]:
    """The credential headers and ``extra`` header names, in lower case."""
    return CREDENTIAL_HEADERS | {name.lower() for name in extra}


@dataclass(frozen=True)
class Credentials:
    """Where one route's requests carry credentials beyond the credential headers.

    Found by an integration that knows the route's parameters (FastAPI's ``Header()``,
    ``Cookie()`` and security scheme parameters): ``arguments`` are the names of
    parameters whose values are never stored, ``headers`` more header names (an
    ``APIKeyHeader``'s), ``query`` query parameters (an ``APIKeyQuery``'s).
    """

    arguments: frozenset[str] = frozenset()
    headers: frozenset[str] = frozenset()
    query: frozenset[str] = frozenset()


NO_CREDENTIALS = Credentials()


@dataclass(frozen=True)
class RequestSnapshot:
    """The parts of an HTTP request a handler reads, rebuilt in the worker.

    Header names are lower case. ``arguments`` holds values a framework already
    validated (FastAPI's path, query and body parameters), stored as JSON;
    ``withheld`` names the arguments whose values carried credentials and were not
    stored (snapshots stored before it existed load with none).
    """

    method: str
    path: str
    query_string: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    path_params: dict[str, Any] = field(default_factory=dict)
    client: tuple[str, int] | None = None
    scheme: str = "http"
    server: tuple[str, int] | None = None
    root_path: str = ""
    arguments: dict[str, Any] | None = None
    withheld: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def redacted(
        self, extra: Iterable[str] = (), credentials: Credentials = NO_CREDENTIALS
    ) -> RequestSnapshot:
        """This snapshot without credentials: the credential headers, ``extra`` and
        ``credentials.headers`` header names, ``credentials.query`` query parameters,
        and the values of ``credentials.arguments`` (their names go to ``withheld``)."""
        hidden = hidden_headers(extra) | credentials.headers
        kept = tuple((k, v) for k, v in self.headers if k not in hidden)
        query = self.query_string
        if credentials.query:
            query = "&".join(
                part
                for part in query.split("&")
                if unquote_plus(part.partition("=")[0]) not in credentials.query
            )
        arguments = self.arguments
        withheld = set(self.withheld)
        if arguments is not None and credentials.arguments & arguments.keys():
            withheld |= credentials.arguments & arguments.keys()
            arguments = {k: v for k, v in arguments.items() if k not in withheld}
        return replace(
            self,
            query_string=query,
            headers=kept,
            arguments=arguments,
            withheld=tuple(sorted(withheld)),
        )

    def carried_credentials(
        self, extra: Iterable[str] = (), credentials: Credentials = NO_CREDENTIALS
    ) -> list[tuple[str, str]]:
        """The credentials this request carries, as ``(where, value)`` pairs in a fixed
        order: the headers ``redacted`` drops, then the query parameters."""
        hidden = hidden_headers(extra) | credentials.headers
        found = sorted((f"header:{k}", v) for k, v in self.headers if k in hidden)
        if credentials.query:
            for part in self.query_string.split("&"):
                name, _, value = part.partition("=")
                if unquote_plus(name) in credentials.query:
                    found.append((f"query:{unquote_plus(name)}", unquote_plus(value)))
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query_string": self.query_string,
            "headers": [list(pair) for pair in self.headers],
            "body": base64.b64encode(self.body).decode("ascii"),
            "path_params": self.path_params,
            "client": list(self.client) if self.client else None,
            "scheme": self.scheme,
            "server": list(self.server) if self.server else None,
            "root_path": self.root_path,
            "arguments": self.arguments,
            "withheld": list(self.withheld),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestSnapshot:
        client = data.get("client")
        server = data.get("server")
        return cls(
            method=data["method"],
            path=data["path"],
            query_string=data.get("query_string", ""),
            headers=tuple((str(k), str(v)) for k, v in data.get("headers", ())),
            body=base64.b64decode(data.get("body", "")),
            path_params=dict(data.get("path_params") or {}),
            client=(str(client[0]), int(client[1])) if client else None,
            scheme=data.get("scheme", "http"),
            server=(str(server[0]), int(server[1])) if server else None,
            root_path=data.get("root_path", ""),
            arguments=data.get("arguments"),
            withheld=tuple(str(name) for name in data.get("withheld") or ()),
        )
