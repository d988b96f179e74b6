"""Where ``reliable``'s log lines go before the application configures logging.

Everything is logged under the ``reliable`` logger (``reliable.worker``,
``reliable.store``). A worker's start, its stop, and every failed attempt matter from
the first minute, also in a program that has not configured ``logging`` yet (where
Python would print warnings only, and drop the rest). So when a worker starts and no
handler would receive the ``reliable`` logger's lines, ``default_handler`` is added: it
writes them to stderr, at level INFO, and steps aside (writes nothing) as soon as the
root logger has a handler of its own, so that nothing is printed twice. Remove it with
``logging.getLogger("reliable").removeHandler(reliable.logs.default_handler)``.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "reliable"


def _root_unconfigured(_record: logging.LogRecord) -> bool:
    return not logging.getLogger().handlers


default_handler = logging.StreamHandler(sys.stderr)
default_handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s"))
default_handler.addFilter(_root_unconfigured)


def install_default_handler() -> None:
    """Add ``default_handler`` to the ``reliable`` logger if its lines would be lost."""
    logger = logging.getLogger(LOGGER)
    if default_handler in logger.handlers or logger.hasHandlers():
        return
    logger.addHandler(default_handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
