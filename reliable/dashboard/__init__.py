"""The dashboard: see every job and act on it (SPEC §8).

Mounted at ``{RELIABLE_URL_PREFIX}/`` by the Flask and Starlette integrations, or
served alone by ``serve(rel)`` (``reliable dashboard``). ``Console`` is the whole of it
as a function of a request; the rest translates.
"""

from __future__ import annotations

from .console import Console
from .request import ConsoleRequest
from .wsgi import DashboardApp, make_dashboard_server, serve

__all__ = ["Console", "ConsoleRequest", "DashboardApp", "make_dashboard_server", "serve"]
