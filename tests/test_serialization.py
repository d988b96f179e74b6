"""Arguments and results are JSON, plus tagged common types; never pickle."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Annotated

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from reliable import ManualClock, Reliable, SerializationError, Task, register_type, serialization
from reliable.serialization import TAG, dumps, loads, registered


@dataclass
class Invoice:
    number: int
    issued: date
    total: Decimal


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True, "ü"]},
        datetime(2026, 11, 28, 12, 30, tzinfo=timezone.utc),
        date(2026, 1, 2),
        time(3, 4, 5),
        timedelta(hours=2),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        Decimal("10.25"),
        b"\x00\xffbytes",
        {1, 2, 3},
        Invoice(7, date(2026, 1, 1), Decimal("99.90")),
        [Invoice(1, date(2026, 2, 3), Decimal("1"))],
    ],
)
def test_round_trip_keeps_the_type(value: object) -> None:
    back = loads(dumps(value))
    assert back == value
    assert type(back) is type(value)


def test_unsupported_type_names_it() -> None:
    with pytest.raises(SerializationError, match="object"):
        dumps({"x": object()})


def test_local_dataclass_is_refused_with_a_reason() -> None:
    @dataclass
    class Local:
        x: int

    with pytest.raises(SerializationError, match="inside a function"):
        dumps(Local(1))


def test_non_json_argument_fails_at_enqueue_and_stores_nothing(rel: Reliable) -> None:
    @rel.task
    def handle(value: object) -> None:
        return None

    with pytest.raises(SerializationError, match="socket"):
        import socket

        with socket.socket() as sock:
            handle.enqueue(sock)
    assert rel.store.count_by_status() == {}


# Stored text must never choose code: the tag key escapes in the caller's dictionaries,
# and dataclasses and pydantic models decode only from registered classes.

TAG_LIKE = ["$reliable", "$reliable$", "$reliable$$", "value", "type"]
TAGS = ["datetime", "date", "time", "timedelta", "uuid", "decimal", "bytes", "set"]
NEVER_IMPORTED = ["tabnanny", "reliable_tests_no_such_module"]

json_keys = st.sampled_from(TAG_LIKE) | st.text(max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from(TAG_LIKE + TAGS)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=20,
)


@dataclass
class Box:
    content: object
    label: str = ""


rich_values = st.recursive(
    json_scalars
    | st.datetimes()
    | st.dates()
    | st.times()
    | st.timedeltas(min_value=-timedelta(days=9999), max_value=timedelta(days=9999))
    | st.uuids()
    | st.decimals(allow_nan=False)
    | st.binary(max_size=8)
    | st.sets(st.integers(), max_size=3),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(json_keys, inner, max_size=4)
        | st.builds(Box, inner, st.sampled_from(TAG_LIKE))
    ),
    max_leaves=20,
)


def tag_shaped(value: st.SearchStrategy[object]) -> st.SearchStrategy[dict[str, object]]:
    """Dicts shaped like every tag ``dumps`` writes, naming modules that must stay unloaded."""
    return st.fixed_dictionaries(
        {TAG: st.sampled_from([*TAGS, "dataclass", "pydantic", "pickle"]), "value": value},
        optional={"type": st.sampled_from([f"{name}:check" for name in NEVER_IMPORTED])},
    )


@pytest.fixture
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No class registered, as in a process that has declared nothing yet."""
    monkeypatch.setattr(serialization, "_registry", {})
    monkeypatch.setattr(serialization, "_names", {})


def forget_registrations() -> None:
    serialization._registry.clear()
    serialization._names.clear()


@settings(database=None, deadline=None)
@given(json_values)
def test_any_json_value_round_trips(value: object) -> None:
    assert loads(dumps(value)) == value


@settings(database=None, deadline=None)
@given(rich_values)
def test_tag_like_keys_round_trip_next_to_tagged_values(value: object) -> None:
    assert loads(dumps(value)) == value


@settings(database=None, deadline=None)
@given(
    tag_shaped(json_values).flatmap(
        lambda d: st.sampled_from([d, [d], {"body": d}]) | st.builds(Box, st.just(d))
    )
)
def test_a_dict_shaped_like_a_tag_round_trips_and_imports_nothing(value: object) -> None:
    assert loads(dumps(value)) == value
    assert not set(NEVER_IMPORTED) & set(sys.modules)


def test_the_callers_tag_key_is_escaped() -> None:
    assert dumps({TAG: 1, "$reliable$": [{TAG: 2}]}) == (
        '{"$reliable$":1,"$reliable$$":[{"$reliable$":2}]}'
    )
    assert loads('{"$reliable$":1,"$reliable$$":2}') == {TAG: 1, "$reliable$": 2}


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
@pytest.mark.usefixtures("empty_registry")
def test_an_unregistered_class_is_refused_and_not_imported(kind: str) -> None:
    for module in NEVER_IMPORTED:
        text = f'{{"args":[{{"{TAG}":"{kind}","type":"{module}:Thing","value":{{}}}}]}}'
        with pytest.raises(SerializationError, match=rf"'{module}:Thing'.*register_type\(Thing\)"):
            loads(text)
        assert module not in sys.modules


def test_a_class_decodes_by_its_registered_name_only(empty_registry: None) -> None:
    register_type(Invoice, "invoice")
    invoice = Invoice(7, date(2026, 1, 1), Decimal("99.90"))
    text = dumps(invoice)
    assert '"type":"invoice"' in text
    assert loads(text) == invoice
    forget_registrations()
    with pytest.raises(SerializationError, match="'invoice'"):
        loads(text)


class Label(BaseModel):
    text: str
    printed: datetime


@dataclass
class Stamp:
    value: Decimal


@dataclass
class Line:
    stamp: Stamp | None


@dataclass
class Parcel:
    weight: Decimal
    sent: date
    lines: list[Line]


@dataclass
class Receipt:
    parcel: Parcel
    labels: dict[str, tuple[Label, ...]]


@pytest.mark.parametrize(
    "text",
    [
        '{"$reliable":"uuid","value":5}',
        '{"$reliable":"uuid","value":"not a uuid"}',
        '{"$reliable":"uuid"}',
        '{"$reliable":"uuid","value":"12345678-1234-5678-1234-567812345678","x":1}',
        '{"$reliable":"datetime","value":"yesterday"}',
        '{"$reliable":"date","value":null}',
        '{"$reliable":"time","value":[1]}',
        '{"$reliable":"timedelta","value":"1h"}',
        '{"$reliable":"timedelta","value":true}',
        '{"$reliable":"timedelta","value":1e300}',
        '{"$reliable":"decimal","value":"ten"}',
        '{"$reliable":"bytes","value":"***"}',
        '{"$reliable":"set","value":[[1]]}',
        '{"$reliable":"set","value":{}}',
        '{"$reliable":"pickle","value":"gASVAA=="}',
        '{"$reliable":["uuid"],"value":1}',
        '{"$reliable":"dataclass","type":5,"value":{}}',
        '{"$reliable":"dataclass","type":"stamp","value":{"weight":1}}',
        '{"$reliable":"dataclass","type":"stamp","value":[1]}',
        '{"$reliable":"dataclass","type":"label","value":{}}',
        '{"$reliable":"pydantic","type":"label","value":{"text":"x"}}',
        '{"$reliable":"pydantic","type":"stamp","value":{"value":"1"}}',
    ],
)
def test_a_malformed_tag_raises_serialization_error(empty_registry: None, text: str) -> None:
    register_type(Stamp, "stamp")
    register_type(Label, "label")
    with pytest.raises(SerializationError, match=r"malformed|unknown|not a|no type") as raised:
        loads(text)
    assert type(raised.value) is SerializationError


def test_declaring_a_task_registers_the_classes_its_hints_name(
    empty_registry: None, rel: Reliable
) -> None:
    @rel.task
    def ship(parcel: Parcel, labels: list[Annotated[Label, "printed"]] | None = None) -> Receipt:
        return Receipt(parcel, {"all": tuple(labels or ())})

    @rel.task
    def unresolved(thing: NoSuchName) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    assert set(registered().values()) == {Parcel, Line, Stamp, Label, Receipt}
    assert registered()[f"{__name__}:Parcel"] is Parcel


def test_a_worker_decodes_the_classes_of_the_tasks_it_declares(
    empty_registry: None, rel: Reliable, db_url: str, clock: ManualClock
) -> None:
    received: list[Parcel] = []

    def declare(app: Reliable) -> Task[[Parcel], Receipt]:
        @app.task
        def ship(parcel: Parcel) -> Receipt:
            received.append(parcel)
            label = Label(text="fragile", printed=datetime(2026, 3, 1, tzinfo=timezone.utc))
            return Receipt(parcel, {"front": (label,)})

        return ship

    parcel = Parcel(Decimal("1.5"), date(2026, 3, 1), [Line(Stamp(Decimal("0.85"))), Line(None)])
    handle = declare(rel).enqueue(parcel)
    forget_registrations()  # the worker below stands for another process
    worker = Reliable(db_url, clock=clock, embedded_worker=False)
    try:
        declare(worker)
        assert worker.run_until_idle() == 1
    finally:
        worker.close()
    assert received == [parcel]
    assert type(received[0].lines[0].stamp) is Stamp
    assert handle.result(timeout=5).labels["front"][0].text == "fragile"


def test_a_request_body_shaped_like_a_tag_reaches_the_task_unchanged(rel: Reliable) -> None:
    body = {TAG: "dataclass", "type": "tabnanny:check", "value": {TAG: "uuid", "value": 5}}
    received: list[object] = []

    @rel.task
    def handle(document: dict[str, object]) -> None:
        received.append(document)

    handle.enqueue(body)
    assert rel.run_until_idle() == 1
    assert received == [body]
    assert "tabnanny" not in sys.modules
