"""A worker's helper threads: each runs one loop until it is closed."""

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
