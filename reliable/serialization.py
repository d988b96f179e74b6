"""JSON encoding of job arguments, results and step values; never pickle.

Plain JSON values pass through unchanged. Datetimes, dates, times, timedeltas, UUIDs,
Decimals, bytes, sets, dataclasses and pydantic models are written as tagged objects
``{"$reliable": <tag>, "value": ...}`` (dataclasses and pydantic models also carry
``"type": <registered name>``) and come back as the same type. Tuples come back as
lists and dictionary keys as strings, as in JSON.

Stored text never chooses code. Decoding knows a closed set of tags, and rebuilds a
dataclass or pydantic model only when its class is registered in this process under
the name the text gives; nothing is imported by a name found in the data. A class is
registered by ``register_type(cls)``, when a task whose type hints name it is declared
(``register_annotations``), and when this process encodes one of its instances.

A dictionary of the caller's own whose keys include ``"$reliable"`` comes back
unchanged: such keys are escaped when written (see ``_escape_key``), so the bare key
only ever marks a tag.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
import threading
import typing
import uuid
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Any, TypeVar

from .errors import SerializationError

TAG = "$reliable"
# How the tag key starts in text written by ``dumps`` (``ensure_ascii=False`` writes it
# literally). Text without it holds no tag and no escaped key, so it needs no hook.
_TAG_IN_TEXT = '"' + TAG
_ESCAPED_IN_TEXT = _TAG_IN_TEXT + "$"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")

T = TypeVar("T")

_registry: dict[str, type] = {}  # the name written in "type" -> the class it decodes to
_names: dict[type, str] = {}  # the class -> the name its instances are written with


def _kind(cls: object) -> str | None:
    """``"dataclass"``, ``"pydantic"`` or ``None``: the tag instances of ``cls`` get."""
    if not isinstance(cls, type):
        return None
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    if hasattr(cls, "model_validate") and hasattr(cls, "model_dump"):
        return "pydantic"
    return None


def _default_name(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise SerializationError(
            f"{cls.__qualname__} is defined inside a function; define it at module level "
            "so a worker can register it, or give it a name: reliable.register_type(cls, name)"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


def register_type(cls: type[T], name: str | None = None) -> type[T]:
    """Let stored values tagged with ``name`` decode to ``cls``; return ``cls``.

    ``cls`` is a dataclass or a pydantic model class; ``name`` defaults to
    ``"module:Qualname"`` and is what instances of ``cls`` are written with. Usable as
    a class decorator. Declaring a task registers the classes its type hints name, and
    encoding an instance registers its class, so a call is needed only for classes a
    worker meets elsewhere (a step's result, an event's data). Registering another
    class under a taken name replaces it.

    Raises ``TypeError`` when ``cls`` is neither, or ``name`` is empty, and
    ``SerializationError`` when ``name`` is omitted for a class defined inside a function.
    """
    if _kind(cls) is None:
        raise TypeError(f"{cls!r} is not a dataclass or a pydantic model class")
    if name is None:
        name = _default_name(cls)
    elif not isinstance(name, str) or not name:
        raise TypeError(f"a registered type name is a non-empty string, got {name!r}")
    _registry[name] = cls
    _names[cls] = name
    return cls


def registered() -> Mapping[str, type]:
    """A read-only view of the registered classes, by the name they are written with."""
    return MappingProxyType(_registry)


def register_annotations(fn: Callable[..., object]) -> None:
    """Register every dataclass and pydantic model class named in ``fn``'s type hints.

    Parameters and the return annotation are searched, inside ``Optional``, unions,
    ``Annotated`` and generic containers, and so are the fields of the dataclasses
    found. Hints that cannot be resolved (a forward reference to an unknown name) are
    skipped, as are classes defined inside a function.
    """
    seen: set[type] = set()
    for hint in _type_hints(fn).values():
        _register_hint(hint, seen)


def _type_hints(obj: object) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except (NameError, TypeError):
        return {}


def _register_hint(hint: object, seen: set[type]) -> None:
    if isinstance(hint, type) and _kind(hint) is not None and hint not in seen:
        seen.add(hint)
        if "<locals>" not in hint.__qualname__ and hint not in _names:
            register_type(hint)
        if dataclasses.is_dataclass(hint):
            # Nested dataclass fields are written as tags of their own.
            for field_hint in _type_hints(hint).values():
                _register_hint(field_hint, seen)
    for arg in typing.get_args(hint):
        _register_hint(arg, seen)


def _class_name(cls: type) -> str:
    name = _names.get(cls)
    if name is None:
        register_type(cls)
        name = _names[cls]
    return name


def _is_pydantic_model(value: object) -> bool:
    cls = type(value)
    return hasattr(cls, "model_validate") and hasattr(value, "model_dump")


def _timedelta_value(value: timedelta) -> float | list[int]:
    """Seconds, where a float keeps every microsecond (below some 270 years); else
    ``[days, seconds, microseconds]``, exact."""
    seconds = value.total_seconds()
    try:
        if timedelta(seconds=seconds) == value:
            return seconds
    except OverflowError:
        pass
    return [value.days, value.seconds, value.microseconds]


def _timedelta(value: object) -> timedelta:
    if isinstance(value, list):
        if len(value) != 3 or not all(type(part) is int for part in value):
            raise TypeError("expected seconds, or [days, seconds, microseconds]")
        return timedelta(days=value[0], seconds=value[1], microseconds=value[2])
    return timedelta(seconds=_seconds(value))


def _encode(value: object) -> dict[str, Any]:
    if isinstance(value, datetime):
        return {TAG: "datetime", "value": value.isoformat()}
    if isinstance(value, date):
        return {TAG: "date", "value": value.isoformat()}
    if isinstance(value, time):
        return {TAG: "time", "value": value.isoformat()}
    if isinstance(value, timedelta):
        return {TAG: "timedelta", "value": _timedelta_value(value)}
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
        return {TAG: "dataclass", "type": _class_name(type(value)), "value": fields}
    if _is_pydantic_model(value):
        dumped = value.model_dump(mode="json")  # type: ignore[attr-defined]
        return {TAG: "pydantic", "type": _class_name(type(value)), "value": dumped}
    raise SerializationError(
        f"cannot store a value of type {type(value).__module__}.{type(value).__qualname__} "
        "as JSON; supported: JSON types, datetime, date, time, timedelta, UUID, Decimal, "
        "bytes, set, dataclasses and pydantic models"
    )


class _TagCount(threading.local):
    """How many tags the running ``dumps`` of this thread has written."""

    tags = 0


_tag_count = _TagCount()


def _encode_counted(value: object) -> dict[str, Any]:
    _tag_count.tags += 1
    return _encode(value)


def _escape_key(key: object) -> object:
    # "$reliable", "$reliable$", "$reliable$$", ... gain one "$" and lose it when read,
    # so a caller's key never reads as the tag key and every such key comes back as it
    # was. The pattern is closed under the escape, so escaping stays one-to-one.
    if isinstance(key, str) and key.rstrip("$") == TAG:
        return key + "$"
    return key


def _escaped(value: object) -> object:
    """``value`` as plain JSON data: tags written out, the caller's tag-like keys escaped."""
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dict):
        return {_escape_key(key): _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    tag = _encode(value)
    return {**tag, "value": _escaped(tag["value"])}


_ENCODER = json.JSONEncoder(
    default=_encode_counted, ensure_ascii=False, allow_nan=False, separators=(",", ":")
)


def dumps(value: object) -> str:
    """Encode ``value`` as JSON text; raise ``SerializationError`` naming a type that can't be.

    The caller's dictionaries may use any keys, ``"$reliable"`` included; they come back
    from ``loads`` unchanged.
    """
    # Encode once as is, counting the tags written. Every tag writes the tag key once, so
    # more occurrences than tags mean a caller's key looks like it (or a string merely
    # starts so): only then walk the value to escape such keys, and encode again.
    outer = _tag_count.tags  # restored below, in case a model's serializer calls dumps
    _tag_count.tags = 0
    try:
        text = _ENCODER.encode(value)
        tags = _tag_count.tags
        if _TAG_IN_TEXT in text and text.count(_TAG_IN_TEXT) > tags:
            text = _ENCODER.encode(_escaped(value))
    except SerializationError:
        raise
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"cannot store value as JSON: {exc}") from exc
    except RecursionError as exc:
        raise SerializationError("cannot store value as JSON: it is nested too deeply") from exc
    finally:
        _tag_count.tags = outer
    if not text.isascii() and _SURROGATE.search(text):
        # A lone surrogate (from JSON such as "\ud800", or a file name) has no UTF-8 form,
        # so no database takes it: write it escaped, as ensure_ascii would; loads reads it.
        # Two in a row that make a pair would come back as the one character they encode.
        if _SURROGATE_PAIR.search(text):
            raise SerializationError(
                "cannot store value as JSON: a string holds a surrogate pair as two code "
                "points, which JSON cannot tell from the character they encode"
            )
        text = _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
    return text


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number of seconds, got {type(value).__name__}")
    return value


def _elements(value: object) -> set[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return set(value)


_BUILT_IN: dict[str, Callable[[object], object]] = {
    "datetime": lambda value: datetime.fromisoformat(_text(value)),
    "date": lambda value: date.fromisoformat(_text(value)),
    "time": lambda value: time.fromisoformat(_text(value)),
    "timedelta": _timedelta,
    "uuid": lambda value: uuid.UUID(_text(value)),
    "decimal": lambda value: Decimal(_text(value)),
    "bytes": lambda value: base64.b64decode(_text(value), validate=True),
    "set": _elements,
}


def _registered_class(obj: dict[str, Any], kind: str) -> type:
    name = obj.get("type")
    if not isinstance(name, str):
        raise SerializationError(f"a stored {kind} names no type: {obj!r}")
    cls = _registry.get(name)
    if cls is None:
        shown = name.rpartition(":")[2] or name
        raise SerializationError(
            f"cannot decode a stored {kind} of type {name!r}: no class is registered under "
            f"that name in this process; call reliable.register_type({shown}) where it is "
            "defined, or annotate the task's parameters with it"
        )
    if _kind(cls) != kind:
        raise SerializationError(f"{name!r} is registered as {cls!r}, which is not a {kind}")
    return cls


def _rebuild(cls: type, kind: str, value: object) -> object:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object of fields, got {type(value).__name__}")
    if kind == "dataclass":
        return cls(**value)
    return cls.model_validate(value)  # type: ignore[attr-defined]


def _decode_tag(obj: dict[str, Any]) -> object:
    tag = obj[TAG]
    if tag in ("dataclass", "pydantic"):
        if len(obj) != 3 or "value" not in obj:
            raise SerializationError(f"malformed stored {tag}: {obj!r}")
        cls = _registered_class(obj, tag)
        build: Callable[[object], object] = functools.partial(_rebuild, cls, tag)
    else:
        decoder = _BUILT_IN.get(tag) if isinstance(tag, str) else None
        if decoder is None:
            raise SerializationError(f"unknown stored type tag {tag!r}")
        if len(obj) != 2 or "value" not in obj:
            raise SerializationError(f"malformed stored {tag}: {obj!r}")
        build = decoder
    try:
        return build(obj["value"])
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise SerializationError(f"malformed stored {tag}: {exc}") from exc


def _decode(obj: dict[str, Any]) -> object:
    return _decode_tag(obj) if TAG in obj else obj


def _decode_escaped(obj: dict[str, Any]) -> object:
    if TAG in obj:
        return _decode_tag(obj)
    if not any(key.rstrip("$") == TAG for key in obj):
        return obj
    return {key[:-1] if key.rstrip("$") == TAG else key: item for key, item in obj.items()}


# object_hook runs on the innermost objects first: a caller's escaped dict is restored
# after the hook has seen its escaped keys, so it is never taken for a tag.
_TAG_DECODER = json.JSONDecoder(object_hook=_decode)
_ESCAPED_DECODER = json.JSONDecoder(object_hook=_decode_escaped)


def loads(text: str) -> Any:
    """Decode JSON text written by ``dumps``, rebuilding the tagged types.

    Raises ``SerializationError`` for an unknown tag, a malformed tagged value, or a
    dataclass or pydantic model whose class is not registered (see ``register_type``).
    """
    if _TAG_IN_TEXT not in text:
        return json.loads(text)
    if _ESCAPED_IN_TEXT not in text:
        return _TAG_DECODER.decode(text)
    return _ESCAPED_DECODER.decode(text)
