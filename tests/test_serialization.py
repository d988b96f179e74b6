"""Arguments and results are JSON, plus tagged common types; never pickle."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from reliable import Reliable, SerializationError
from reliable.serialization import dumps, loads


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
