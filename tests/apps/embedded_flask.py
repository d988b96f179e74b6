"""A Flask app whose worker runs inside the web process, for tests that stop it with
SIGTERM: under gunicorn (``tests.apps.embedded_flask:app``) or under Flask's own server
(``python -m tests.apps.embedded_flask PORT``).

``POST /jobs/<name>`` offloads a handler that leaves ``<name>.started`` in the folder
named by ``EMBEDDED_APP_MARKERS`` and then waits for ``<name>.release`` there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from flask import Flask

from reliable.integrations.flask import ReliableFlask

MARKERS = Path(os.environ["EMBEDDED_APP_MARKERS"])

app = Flask(__name__)
reliable = ReliableFlask(app)


@app.get("/")
def ready() -> str:
    return "ready"


@app.post("/jobs/<name>")
@reliable.offload
def job(name: str) -> tuple[dict[str, str], int]:
    (MARKERS / f"{name}.started").touch()
    while not (MARKERS / f"{name}.release").exists():  # deaf to any request to stop
        time.sleep(0.02)
    return {"done": name}, 200


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]))
