"""Every ```python block of README.md and docs/*.md runs as written.

Each block is one test case, named by file and line, run with ``exec`` in a fresh
namespace (``__name__ == "__main__"``, as a pasted script), in a temporary working
directory (so a ``sqlite:///jobs.db`` lands there) with ``RELIABLE_DATABASE_URL``
naming a temporary SQLite file and no other ``RELIABLE_*`` setting in the environment.

Only blocks fenced ```python are run: shell commands are fenced ```sh, and other
fences are not Python. A name a block uses without defining it must be one of
``STUBS``: the reader's own code that the block stands on (``email_provider``, an
existing ``rel``); reliable's own API is never stubbed. Blocks that only define a
route or a task get a follow-up in ``FOLLOW_UPS`` that calls what they defined, so
that what the text around them says is checked too.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from reliable import Reliable
from reliable.integrations.flask import ReliableFlask

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
WAIT = 30.0  # bounds a hang; nothing here should take more than a fraction of it


@dataclass(frozen=True)
class Snippet:
    """One fenced ```python block: its document, the line of its opening fence, its code."""

    path: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Snippet]:
    """The ```python blocks of a Markdown file (info string ``python``, nothing else)."""
    snippets = []
    lines = path.read_text().splitlines()
    opened: tuple[str, str, int] | None = None  # fence, language, line number
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        match = FENCE.match(line)
        if opened is None:
            if match:
                opened, body = (match.group(1), match.group(2), number), []
            continue
        fence, language, start = opened
        if match and match.group(1).startswith(fence) and not match.group(2):
            if language == "python":
                snippets.append(Snippet(path, start, textwrap.dedent("\n".join(body)) + "\n"))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"{path.name}: a fence opened on line {opened[2]} never closes"
    return snippets


SNIPPETS = [snippet for path in DOCUMENTS for snippet in python_blocks(path)]


# -- the reader's own code ---------------------------------------------------------------


class Outbox:
    """Stands in for an email API: keeps what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, *message: Any) -> str:
        self.sent.append(message)
        return f"msg-{len(self.sent)}"


def reader_rel(namespace: dict[str, Any]) -> Reliable:
    # Built from the environment like the reader's; the test steps its jobs itself.
    return Reliable()


def reader_app(namespace: dict[str, Any]) -> Flask:
    # Serves the reader's `rel`; its jobs are stepped by the test, not an embedded worker.
    if "rel" not in namespace:
        namespace["rel"] = reader_rel(namespace)
    app = Flask("docs_app")
    app.config["RELIABLE_EMBEDDED_WORKER"] = False
    ReliableFlask(app, namespace["rel"])
    return app


# A placeholder name -> a function of the namespace so far that makes it.
STUBS: dict[str, Callable[[dict[str, Any]], Any]] = {
    # `email_provider`: the reader's email API client (README, the Flask route).
    "email_provider": lambda namespace: Outbox(),
    # `rel`: the reader's existing `Reliable` (docs/flow-control.md, docs/steps.md).
    "rel": reader_rel,
    # `app`: the reader's existing Flask app, with ReliableFlask (docs/flow-control.md).
    "app": reader_app,
    # `fetch_profile`: the reader's function that reads a user's profile (docs/steps.md).
    "fetch_profile": lambda namespace: lambda user_id: {"id": user_id, "email": "ada@x.org"},
    # `send_email`: the reader's function that sends a message (docs/steps.md).
    "send_email": lambda namespace: lambda address: None,
    # `follow_up`: the reader's function run after the survey (docs/steps.md).
    "follow_up": lambda namespace: lambda user_id, answer: None,
}


def free_names(code: str) -> set[str]:
    """Names a block reads that it never binds, and that are not builtins."""
    tree = ast.parse(code)
    bound: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return read - bound - set(dir(builtins))


# -- what a block's text promises, beyond running ------------------------------------------


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT:g}s waiting for {what}")
        time.sleep(0.02)


def readme_flask_route(namespace: dict[str, Any]) -> None:
    """The route answers 202 with a Location; the embedded worker runs the handler."""
    client = namespace["app"].test_client()
    response = client.post("/orders/42/receipt", json={"email": "ada@example.com"})
    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    documents: list[dict[str, Any]] = []

    def finished() -> bool:
        documents.append(client.get(f"{location}?wait=1").get_json())
        return bool(documents[-1]["status"] in ("succeeded", "failed"))

    poll(finished, "the job to finish")
    assert documents[-1]["status"] == "succeeded", documents[-1]
    assert documents[-1]["result"]["status_code"] == 201
    assert documents[-1]["result"]["body"] == {"sent": True}
    assert namespace["email_provider"].sent == [("ada@example.com", 42)]


def flow_control_options(namespace: dict[str, Any]) -> None:
    """The task takes the limits it shows; the route needs the header its key names."""
    rel: Reliable = namespace["rel"]
    handle = namespace["sync_account"].enqueue("acme", 7)
    assert rel.run_until_idle() == 1
    assert handle.result(timeout=0) is None
    client = namespace["app"].test_client()
    accepted = client.post("/accounts/3/close", headers={"X-Tenant": "acme"})
    assert accepted.status_code == 202, accepted.text
    missing = client.post("/accounts/3/close")
    assert missing.status_code == 400, missing.text
    limits = {row["task"]: row["limit"] for row in rel.flow_state()["rate_limits"]}
    assert limits == {"sync_account": 100, "close_account": 10}


def steps_onboard(namespace: dict[str, Any]) -> None:
    """The steps before the sleep run and are stored; the job then sleeps."""
    rel: Reliable = namespace["rel"]
    handle = namespace["onboard"].enqueue(7)
    rel.run_until_idle()
    assert handle.status() == "sleeping"
    steps = {step.name: step for step in rel.get_steps(handle.id)}
    assert steps["fetch-profile"].result == {"id": 7, "email": "ada@x.org"}
    assert steps["send-welcome"].status == "succeeded"
    assert "survey" not in steps


# Text that marks one block -> what to do with the namespace it leaves.
FOLLOW_UPS: dict[str, Callable[[dict[str, Any]], None]] = {
    "@reliable.offload(retries=5": readme_flask_route,
    "def close_account(account_id: int)": flow_control_options,
    "def onboard(user_id: int)": steps_onboard,
}


# -- the tests -----------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory of its own, and ``RELIABLE_DATABASE_URL`` the only setting."""
    for variable in list(os.environ):
        if variable.startswith("RELIABLE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("RELIABLE_DATABASE_URL", f"sqlite:///{tmp_path / 'reliable.db'}")
    monkeypatch.chdir(tmp_path)
    # A block's embedded Flask worker installs a SIGTERM handler; pytest gets its own back.
    sigterm = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, sigterm)


def close_all(namespace: dict[str, Any]) -> None:
    """Stop the workers and close the databases a block (or a stub) opened."""
    for value in namespace.values():
        if isinstance(value, ReliableFlask):
            value.reliable.close()
        elif isinstance(value, Reliable):
            value.close()


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[snippet.name for snippet in SNIPPETS])
def test_snippet_runs_as_written(snippet: Snippet, sandbox: Path) -> None:
    unknown = free_names(snippet.code) - set(STUBS)
    assert not unknown, f"{snippet.name} uses names it never defines: {sorted(unknown)}"
    namespace: dict[str, Any] = {"__name__": "__main__"}
    needed = free_names(snippet.code)
    for name, make in STUBS.items():
        if name in needed and name not in namespace:
            namespace[name] = make(namespace)
    # Padded so that a traceback names the document's own line numbers.
    code = compile("\n" * snippet.line + snippet.code, str(snippet.path), "exec")
    try:
        exec(code, namespace)
        for marker, follow_up in FOLLOW_UPS.items():
            if marker in snippet.code:
                follow_up(namespace)
    finally:
        close_all(namespace)


def test_there_are_snippets_and_every_stub_and_follow_up_is_used() -> None:
    assert len({snippet.path for snippet in SNIPPETS}) >= 3
    used = set().union(*(free_names(snippet.code) for snippet in SNIPPETS))
    assert set(STUBS) <= used, f"stubs no block needs: {sorted(set(STUBS) - used)}"
    for marker in FOLLOW_UPS:
        marked = [snippet.name for snippet in SNIPPETS if marker in snippet.code]
        assert len(marked) == 1, f"{marker!r} should mark one block, marks {marked}"
