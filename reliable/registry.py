"""``Registry``: the tasks of one application, by name, with the runtime they run in.

What workers and attempts need to know about the application: which function a job's
task name stands for, with which options, and in which queues to look for jobs. The
``Reliable`` façade is a registry with the public API on top.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError
from .overrides import apply_overrides
from .runtime import Runtime
from .tasks import DEFAULT_QUEUE, Task


class Registry:
    """Registered tasks by name (``tasks``), and the ``runtime`` they run in."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tasks: dict[str, Task[Any, Any]] = {}

    def register(self, task: Task[Any, Any]) -> None:
        """Add a task to this application; its name must be unused.

        ``RELIABLE_TASK_<NAME>_<OPTION>`` environment variables override the
        decorator's ``concurrency``, ``rate_limit``, ``throttle``, ``priority``,
        ``retries`` and ``timeout``; a bad value raises ``ConfigError`` naming the
        variable.
        """
        task.options = apply_overrides(task.options, os.environ)
        existing = self.tasks.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ConfigError(
                "name",
                f"a task named {task.name!r} is already registered "
                f"({existing.fn.__module__}.{existing.fn.__qualname__}); pass name=...",
            )
        self.tasks[task.name] = task

    def limited_at_claim(self) -> bool:
        """Whether any task here has a concurrency cap or a throttle (checked at claim)."""
        return any(task.options.flow.limited_at_claim for task in self.tasks.values())

    def rate_limited(self) -> bool:
        """Whether any task here has a rate limit (its admissions are pruned by workers)."""
        return any(task.options.flow.rate_limits for task in self.tasks.values())

    def queues(self) -> list[str]:
        """Every queue a registered task uses (and ``default``)."""
        return sorted({DEFAULT_QUEUE, *(task.options.queue for task in self.tasks.values())})
