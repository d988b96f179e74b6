"""``python -m reliable.cli``: the ``reliable`` command."""

from __future__ import annotations

from .main import main

raise SystemExit(main())
