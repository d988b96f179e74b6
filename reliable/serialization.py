"""JSON encoding of job arguments, results and step values; never pickle.

Plain JSON values pass through unchanged. Datetimes, dates, times, UUIDs, Decimals,
bytes, sets, dataclasses and pydantic models are written as tagged objects
``{"$reliable": <type>, "value": ...}`` and come back as the same type. Tuples come
back as lists and dictionary keys as strings, as in JSON.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from .errors import SerializationError

TAG = "$reliable"


def _class_path(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise SerializationError(
            f"{cls.__qualname__} is defined inside a function; "
            "define it at module level so a worker can rebuild it"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_pydantic_model(value: object) -> bool:
    cls = type(value)
    return hasattr(cls, "model_validate") and hasattr(value, "model_dump")


def _encode(value: object) -> dict[str, Any]:
    if isinstance(value, datetime):
        return {TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, date):
        return {TAG: "date", "value": value.isoformat()}
    if isinstance(value, time):
        return {TAG: "time", "value": value.isoformat()}
    if isinstance(value, timedelta):
        return {TAG: "timedelta", "value": value.total_seconds()}
    if isinstance(value, uuid.UUID):
        return {TAG: "uuid", "value": str(value)}
    if isinstance(value, Decimal):
        return {TAG: "decimal", "value": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {TAG: "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, set | frozenset):
        return {TAG: "set", "value": list(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "type": _class_path(type(value)), "value": fields}
    if _is_pydantic_model(value):
        dumped = value.model_dump(mode="json")  # type: ignore[attr-defined]
        return {TAG: "pydantic", "type": _class_path(type(value)), "value": dumped}
    raise SerializationError(
        f"cannot store a value of type {type(value).__module__}.{type(value).__qualname__} "
        "as JSON; supported: JSON types, datetime, date, time, timedelta, UUID, Decimal, "
        "bytes, set, dataclasses and pydantic models"
    )


def _load_class(path: str, kind: str) -> type:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SerializationError(f"cannot find {kind} class {path!r}: {exc}") from exc
    if kind == "dataclass" and not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise SerializationError(f"{path!r} is not a dataclass")
    if kind == "pydantic" and not hasattr(obj, "model_validate"):
        raise SerializationError(f"{path!r} is not a pydantic model")
    return obj  # type: ignore[no-any-return]


def _decode(obj: dict[str, Any]) -> Any:
    tag = obj.get(TAG)
    if tag is None:
        return obj
    value: Any = obj.get("value")
    if tag == "datetime":
        return datetime.fromisoformat(value)
    if tag == "date":
        return date.fromisoformat(value)
    if tag == "time":
        return time.fromisoformat(value)
    if tag == "timedelta":
        return timedelta(seconds=value)
    if tag == "uuid":
        return uuid.UUID(value)
    if tag == "decimal":
        return Decimal(value)
    if tag == "bytes":
        return base64.b64decode(value)
    if tag == "set":
        return set(value)
    if tag == "dataclass":
        return _load_class(obj["type"], "dataclass")(**value)
    if tag == "pydantic":
        return _load_class(obj["type"], "pydantic").model_validate(value)  # type: ignore[attr-defined]
    raise SerializationError(f"unknown stored type tag {tag!r}")


def dumps(value: object) -> str:
    """Encode ``value`` as JSON text; raise ``SerializationError`` naming a type that can't be."""
    try:
        return json.dumps(
            value, default=_encode, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
    except SerializationError:
        raise
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot store value as JSON: {exc}") from exc


def loads(text: str) -> Any:
    """Decode JSON text written by ``dumps``, rebuilding the tagged types."""
    return json.loads(text, object_hook=_decode)
