"""Which ``Reliable`` a command works on: the one an application (``module:attribute``)
carries, found by ``locate``."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from ..app import Reliable
from ..errors import ReliableError


def _attribute(value: object, name: str) -> Any:
    try:
        return getattr(value, name, None)
    except Exception:  # proxies such as flask.request raise outside their context
        return None


def _candidates(target: object) -> Iterator[object]:
    yield target
    yield _attribute(target, "reliable")
    extensions = _attribute(target, "extensions")
    if isinstance(extensions, Mapping):
        yield extensions.get("reliable")
    yield _attribute(_attribute(target, "state"), "reliable")
    # Starlette builds its middleware on first use; until then the Reliable is an
    # argument of ``Middleware(ReliableMiddleware, reliable=rel)``.
    middlewares = _attribute(target, "user_middleware")
    for middleware in middlewares if isinstance(middlewares, list | tuple) else ():
        kwargs = _attribute(middleware, "kwargs")
        if isinstance(kwargs, Mapping):
            yield kwargs.get("reliable")


def carried(target: object) -> Reliable | None:
    """The ``Reliable`` that ``target`` is or carries, else ``None``.

    Carriers: a ``ReliableFlask`` (``.reliable``), a Flask app (``app.extensions
    ["reliable"]``), a Starlette or FastAPI app (``app.state.reliable``, or the
    ``reliable=`` argument of its ``ReliableMiddleware``).
    """
    for candidate in _candidates(target):
        if isinstance(candidate, Reliable):
            return candidate
        inner = _attribute(candidate, "reliable")
        if isinstance(inner, Reliable):
            return inner
    return None


def _only_reliable(module: ModuleType) -> Reliable:
    holders: dict[int, tuple[Reliable, list[str]]] = {}
    for name, value in vars(module).items():
        if name.startswith("__") or isinstance(value, ModuleType | type):
            continue
        rel = carried(value)
        if rel is not None:
            holders.setdefault(id(rel), (rel, []))[1].append(name)
    example = f"{module.__name__}:attribute"
    if not holders:
        raise ReliableError(
            f"{module.__name__} holds no Reliable, nor an application that carries one; "
            f"name it as {example}"
        )
    if len(holders) > 1:
        groups = "; ".join(" = ".join(names) for _, names in holders.values())
        raise ReliableError(
            f"{module.__name__} holds {len(holders)} different Reliable objects ({groups}); "
            f"name the one to use as {example}"
        )
    [(rel, _)] = holders.values()
    return rel


def locate(spec: str) -> Reliable:
    """Find the ``Reliable`` of an application given as ``module:attribute`` or ``module``.

    The attribute may be the ``Reliable`` itself or anything carrying one (see
    ``carried``): a ``ReliableFlask``, a Flask app, a Starlette or FastAPI app.
    Without ``:attribute`` the module's variables are searched the same way; they must
    lead to exactly one ``Reliable``. Raises ``ReliableError`` saying what to change.
    """
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReliableError(f"cannot import {module_name!r}: {exc}") from exc
    if not attribute:
        return _only_reliable(module)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ReliableError(f"{module_name} has no attribute {attribute!r}") from None
    found = carried(target)
    if found is None:
        raise ReliableError(f"{spec} is not a Reliable, nor an application that carries one")
    return found
