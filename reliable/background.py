"""A worker's helper threads: each runs one loop until it is closed; ``backoff``, how
long such a loop waits after failures in a row."""

from __future__ import annotations

import threading


class Background:
    """A daemon thread named ``name`` that runs ``_run`` until ``close()``; the loop
    waits on ``self._closed`` so that closing wakes it at once."""

    def __init__(self, name: str) -> None:
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the loop and wait (up to five seconds) for it to end, unless called
        from the loop itself."""
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        raise NotImplementedError


def backoff(failures: int, most: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: 0.1, 0.2, 0.4... up to
    ``most`` (and no overflow, however long the database stays away)."""
    return min(0.05 * 2.0 ** min(failures, 30), most)
