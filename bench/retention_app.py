"""The worker application of ``bench.retention``: the tasks of ``bench.apps``, with every
claim the worker's dispatcher makes timed.

Each claim that leased at least one job appends a line ``<time.time() at its start>
<milliseconds it took> <jobs>`` to the file named by ``BENCH_CLAIM_TIMES`` (flushed
every line, so a worker stopped with SIGTERM loses none).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from reliable.store import Store

from .apps import build

CLAIM_TIMES_ENV = "BENCH_CLAIM_TIMES"

rel = build()

_claim = Store.claim
_lock = threading.Lock()
_path = os.environ.get(CLAIM_TIMES_ENV)
# Open for the life of the worker process: its lines are written as claims happen.
_log = open(_path, "a", buffering=1) if _path else None  # noqa: SIM115


def _timed_claim(self: Store, *args: Any, **kwargs: Any) -> Any:
    started = time.time()
    began = time.perf_counter()
    result = _claim(self, *args, **kwargs)
    spent = (time.perf_counter() - began) * 1000
    if _log is not None and result.jobs:
        with _lock:
            _log.write(f"{started:.6f} {spent:.3f} {len(result.jobs)}\n")
    return result


Store.claim = _timed_claim  # type: ignore[method-assign]
