"""The ``reliable`` command: ``worker``, ``dashboard``, ``jobs list|show|retry|cancel|
replay``, ``pause``, ``resume``, ``schedules``, ``purge``, ``db upgrade|current``.

See docs/cli.md. ``main`` runs it; ``locate`` finds the ``Reliable`` of an application
named as ``module:attribute``.
"""

from __future__ import annotations

from .main import cli, main
from .target import carried, locate

__all__ = ["carried", "cli", "locate", "main"]
