"""The dashboard inside an ASGI application (``ReliableMiddleware``): the request is
read here, and answered by ``Console`` in a thread (it reads the database)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .console import Console
from .request import MAX_FORM_BYTES, ConsoleRequest, parse_cookies

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        if size <= MAX_FORM_BYTES:
            chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[: MAX_FORM_BYTES + 1]


async def answer(
    console: Console, relative: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """Answer an HTTP ``scope`` for the dashboard page ``relative`` (its path after the
    application's ``root_path`` and the dashboard's prefix)."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    client = scope.get("client")
    request = ConsoleRequest(
        method=scope["method"],
        path=relative,
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        cookies=parse_cookies(headers.get("cookie")),
        body=await _body(receive),
        client_host=client[0] if client else None,
        scheme=scope.get("scheme", "http"),
    )
    response = await asyncio.to_thread(console.handle, request)
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers
            ],
        }
    )
    await send({"type": "http.response.body", "body": response.body})
