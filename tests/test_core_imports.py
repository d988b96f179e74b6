"""The core never imports a web framework."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flask", "werkzeug", "starlette", "fastapi"):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Block())
import reliable
import reliable.cli
import reliable.worker
from reliable import Reliable, current_job
print("ok")
"""


def test_core_imports_with_frameworks_unimportable() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"
