"""Real HTTP servers for tests: gunicorn serving a Flask app, uvicorn a Starlette one.

Test modules import it as ``servers`` (pytest puts ``tests/`` on ``sys.path``)::

    with Servers(tmp_path, db_url) as started:
        urls = started.start("flask", 3)

Every server gets the database, no embedded worker (tests count what is accepted) and
a small ``RELIABLE_MAX_PAYLOAD``. gunicorn runs ``count`` worker processes behind one
socket; for uvicorn, ``count`` separate processes each on a port of its own.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from reliable import Reliable

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_PAYLOAD = 4096
TIMEOUT = 30.0
APPS = {"flask": "tests.apps.load_flask:app", "starlette": "tests.apps.load_starlette:app"}
_GUNICORN = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_UVICORN = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class Servers:
    """Server processes of one test, output kept in files; all stopped at the end."""

    def __init__(self, directory: Path, database_url: str) -> None:
        self.directory = directory
        self.database_url = database_url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELIABLE_")}
        self.env.update(
            RELIABLE_DATABASE_URL=database_url,
            RELIABLE_EMBEDDED_WORKER="0",
            RELIABLE_MAX_PAYLOAD=str(MAX_PAYLOAD),
        )
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> Servers:
        rel = Reliable(self.database_url)
        rel.store  # noqa: B018 - the schema exists before several servers open the database
        rel.close()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.directory / f"server-{len(self.started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, *args], cwd=REPO_ROOT, env=self.env, stdout=out, stderr=out
            )
        self.started.append((process, log))
        return process, log

    def start(self, framework: str, count: int) -> list[str]:
        """Serve the ``framework``'s load app with ``count`` processes; their base URLs
        once each answers."""
        app = APPS[framework]
        if framework == "flask":
            # Idle keep-alive connections are kept longer than a loaded run leaves one
            # idle in the client's pool: a server closing one just as the client reuses
            # it resets a request that never reached the app (gunicorn's default: 2 s).
            args = ("-w", str(count), "-k", "gthread", "--threads", "8", "-b", "127.0.0.1:0",
                    "--keep-alive", "75")  # fmt: skip
            started = [self._spawn("-m", "gunicorn", *args, app)]
            pattern = _GUNICORN
        else:
            uvicorn = ("-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0",
                       "--timeout-keep-alive", "75")  # fmt: skip
            started = [self._spawn(*uvicorn, "--no-access-log") for _ in range(count)]
            pattern = _UVICORN
        urls = [self._url(process, log, pattern) for process, log in started]
        for url in urls:
            self._wait_serving(url)
        return urls

    def _url(self, process: subprocess.Popen[bytes], log: Path, pattern: re.Pattern[str]) -> str:
        deadline = time.monotonic() + TIMEOUT
        while (match := pattern.search(log.read_text(errors="replace"))) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start\n{self.logs()}")
            time.sleep(0.05)
        return f"http://127.0.0.1:{match.group(1)}"

    def _wait_serving(self, url: str) -> None:
        """Until the app answers (gunicorn listens before its workers have loaded it)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                if httpx.get(f"{url}/_reliable/jobs/{'0' * 32}", timeout=5).status_code == 404:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server at {url} does not answer\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.args} (exit {process.poll()}):\n"
            f"{log.read_text(errors='replace')[-3000:]}"
            for process, log in self.started
        )

    def tracebacks(self) -> list[str]:
        """Server logs that show a traceback: an error reached the server."""
        return [
            log.read_text(errors="replace")
            for _, log in self.started
            if "Traceback" in log.read_text(errors="replace")
        ]

    def close(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.terminate()
        for process, _ in self.started:
            try:
                process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=TIMEOUT)


def raw_request(url: str, request: bytes, *, half_close: bool = True) -> bytes:
    """Send ``request`` as it is over a new connection, stop sending (a client that went
    away mid-body, when ``half_close``), and return whatever the server answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as connection:
        connection.sendall(request)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)
