"""A request as stored with its job: everything the handler needs, minus credentials."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Never written to the database; RELIABLE_REDACT_HEADERS adds more.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


@dataclass(frozen=True)
class RequestSnapshot:
    """The parts of an HTTP request a handler reads, rebuilt in the worker.

    Header names are lower case. ``arguments`` holds values a framework already
    validated (FastAPI's path, query and body parameters), stored as JSON.
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

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def redacted(self, extra: Iterable[str] = ()) -> RequestSnapshot:
        """This snapshot without credential headers (and ``extra`` header names)."""
        hidden = CREDENTIAL_HEADERS | {name.lower() for name in extra}
        kept = tuple((k, v) for k, v in self.headers if k not in hidden)
        return RequestSnapshot(
            self.method,
            self.path,
            self.query_string,
            kept,
            self.body,
            self.path_params,
            self.client,
            self.scheme,
            self.server,
            self.root_path,
            self.arguments,
        )

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
        )
