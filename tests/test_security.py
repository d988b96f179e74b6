"""What SECURITY.md promises that no other test shows: job ids strong enough to be a
capability, a status document that tells its reader no more than the job's outcome, a
bounded ``?wait=``; and that every test SECURITY.md names exists.
"""

from __future__ import annotations

import re
import uuid
import warnings
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import NonRetriable, Reliable
from reliable.integrations.starlette import ReliableMiddleware
from reliable.web import parse_wait

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


def test_job_ids_are_random_uuid4_with_122_random_bits(rel: Reliable) -> None:
    """The status URL is a capability: its id is a version 4 UUID (122 random bits from
    the operating system's generator), never a counter or a time."""

    @rel.task
    def noop(n: int) -> None: ...

    ids = [noop.enqueue(n).id for n in range(500)]
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        parsed = uuid.UUID(hex=job_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, job_id)
    assert sorted(ids) != ids  # not ordered by creation


def test_the_status_document_tells_the_outcome_not_the_request_nor_the_traceback(
    rel: Reliable,
) -> None:
    @rel.offload(retries=0)
    async def charge(request: Request) -> JSONResponse:
        raise NonRetriable("card declined for card 4111-1111")

    app = Starlette(
        routes=[Route("/charges", charge, methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )
    with TestClient(app) as client:
        accepted = client.post(
            "/charges",
            json={"card": "4111-1111", "cvc": "123"},
            headers={"Authorization": "Bearer secret-token", "X-Trace": "abc"},
        )
        rel.run_until_idle()
        document: dict[str, Any] = client.get(accepted.headers["location"]).json()
    assert set(document) == {
        "id",
        "task",
        "status",
        "attempts",
        "created_at",
        "started_at",
        "finished_at",
        "result",
        "error",
    }
    assert document["status"] == "failed"
    assert set(document["error"]) <= {"type", "message"}  # no traceback, no locals
    text = str(document)
    for secret in ("secret-token", "123", "X-Trace", "Traceback"):
        assert secret not in text
    # The operator (rel.get_job) still sees the traceback.
    assert "Traceback" in str(rel.get_job(document["id"]).error)


def test_a_status_request_holds_a_server_thread_for_a_minute_at_most() -> None:
    for asked in ("60", "61", "3600", "1e9"):
        assert parse_wait(asked) == 60.0


def test_every_test_that_security_md_names_exists() -> None:
    """SECURITY.md says which test shows each protection: each of them is there."""
    root = Path(__file__).resolve().parent.parent
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (root / "SECURITY.md").read_text())
    assert len(named) > 20
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^(async )?def {name}\(", (root / path).read_text(), re.MULTILINE)
    ]
    assert missing == []
