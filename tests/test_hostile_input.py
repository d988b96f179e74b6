"""Hostile input (SPEC §9.7): whatever comes in gets an answer or a clear error, and
changes nothing stored unless it was accepted.

- Properties (hypothesis) of every parser that reads outside input: key specs, rates,
  durations, the JSON codec (a round trip, or ``SerializationError``), the
  ``Idempotency-Key`` header and ``?wait=``.
- The same through Flask and Starlette apps: any ``Idempotency-Key`` value, any body
  for a route keyed on its JSON, is a 202 or a problem+json 4xx, never a 5xx, and
  only a 202 stores a job.
- Bodies: non-UTF-8 bytes reach the handler unchanged; deeply nested JSON, lone
  surrogates and NUL characters in key values are answered, not 500s; truncated and
  chunked-then-abandoned bodies through real servers (gunicorn, uvicorn) store nothing
  and leave the server serving.
"""

from __future__ import annotations

import contextlib
import json
import math
import string
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import MAX_PAYLOAD, Servers, raw_request
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import ConfigError, RateLimit, Reliable, SerializationError
from reliable.durations import parse_duration
from reliable.integrations.flask import ReliableFlask
from reliable.integrations.starlette import ReliableMiddleware
from reliable.limits import check_key, parse_rate
from reliable.serialization import dumps, loads
from reliable.web import InvalidIdempotencyKey, parse_idempotency_key, parse_wait

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PROPERTY = settings(database=None, deadline=None, max_examples=300)
HTTP = settings(
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROBLEM = "application/problem+json"


# -- parsers ---------------------------------------------------------------------------


def send_invoice(order_id: int, tenant: str = "", **extra: Any) -> None:
    """A task's function, for key specs naming its arguments."""


KEY_KINDS = ["arg", "header", "path", "json", "ip", "", "args", "Header", "arg:"]
key_specs = st.one_of(
    st.text(),
    st.builds(
        lambda kind, colon, detail: f"{kind}{colon}{detail}",
        st.sampled_from(KEY_KINDS),
        st.sampled_from([":", "", "::", " :"]),
        st.text(max_size=20),
    ),
)


@PROPERTY
@given(spec=key_specs, route=st.booleans())
def test_a_key_spec_is_accepted_or_refused_naming_the_option(spec: str, route: bool) -> None:
    try:
        check_key(spec, option="concurrency", fn=send_invoice, route=route)
    except ConfigError as exc:
        assert exc.name == "concurrency"
        assert repr(spec) in str(exc) or "key" in str(exc)
        return
    kind, _, detail = spec.partition(":")
    assert (kind, bool(detail)) in {("arg", True), ("header", True), ("path", True)} | {
        ("json", True),
        ("ip", False),
    }
    assert route or kind == "arg"


@PROPERTY
@given(name=st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True))
def test_an_argument_key_of_the_function_is_accepted(name: str) -> None:
    def task(**kwargs: Any) -> None: ...

    check_key(f"arg:{name}", option="rate_limit", fn=task, route=False)
    for kind in ("header", "path", "json"):
        check_key(f"{kind}:{name}", option="rate_limit", fn=task, route=True)


rates = st.one_of(
    st.text(),
    st.from_regex(r"\s*[0-9]{0,25}\s*/\s*[0-9.]{0,25}\s*[a-z]{0,8}\s*", fullmatch=True),
)


@PROPERTY
@given(text=rates)
def test_a_rate_is_parsed_or_refused_naming_the_option(text: str) -> None:
    try:
        count, period = parse_rate(text, name="RELIABLE_TASK_SEND_RATE_LIMIT")
    except ConfigError as exc:
        assert exc.name == "RELIABLE_TASK_SEND_RATE_LIMIT"
        return
    assert count >= 1 and 0 < period < math.inf


UNITS = {"s": 1, "second": 1, "seconds": 1, "m": 60, "minute": 60, "h": 3600, "d": 86400}


@PROPERTY
@given(
    count=st.integers(1, 10**9),
    multiple=st.one_of(st.none(), st.integers(1, 1000)),
    unit=st.sampled_from(sorted(UNITS)),
)
def test_a_well_formed_rate_means_what_it_says(count: int, multiple: int | None, unit: str) -> None:
    text = f"{count}/{'' if multiple is None else multiple}{unit}"
    assert parse_rate(text, name="rate_limit") == (count, (multiple or 1) * UNITS[unit])


durations = st.one_of(
    st.text(),
    st.from_regex(r"\s*[0-9.]{0,30}\s*[a-z]{0,4}\s*", fullmatch=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.timedeltas(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@PROPERTY
@given(value=durations)
def test_a_duration_is_finite_seconds_or_refused_naming_the_option(value: Any) -> None:
    try:
        seconds = parse_duration(value, name="timeout")
    except ConfigError as exc:
        assert exc.name == "timeout"
        return
    assert isinstance(seconds, float) and 0 <= seconds < math.inf


DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


@PROPERTY
@given(amount=st.integers(0, 10**6), unit=st.sampled_from(sorted(DURATION_UNITS)))
def test_a_well_formed_duration_means_what_it_says(amount: int, unit: str) -> None:
    assert parse_duration(f"{amount}{unit}", name="timeout") == amount * DURATION_UNITS[unit]


# -- the JSON codec ----------------------------------------------------------------------


@dataclass(frozen=True)
class Parcel:
    """A registered dataclass (registered when first encoded)."""

    weight: Decimal
    sent: date


# Text with anything in it: lone surrogates, NUL, every plane.
any_text = st.text(st.characters(exclude_categories=[]) | st.characters(categories=["Cs"]))
rich = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    any_text,
    st.binary(),
    st.datetimes(timezones=st.sampled_from([None, timezone.utc])),
    st.dates(),
    st.timedeltas(),
    st.uuids(),
    st.decimals(allow_nan=False),
    st.builds(Parcel, st.decimals(allow_nan=False, allow_infinity=False), st.dates()),
    st.sets(st.integers(), max_size=3),
    st.complex_numbers(),
    st.just(object()),
)
values = st.recursive(
    rich,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(any_text, inner, max_size=4)
    ),
    max_leaves=25,
)


def as_json(value: Any) -> Any:
    """What ``loads(dumps(value))`` gives back: tuples as lists, as in JSON."""
    if isinstance(value, tuple | list):
        return [as_json(item) for item in value]
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    return value


@PROPERTY
@given(value=values)
def test_any_value_round_trips_or_is_refused_with_serialization_error(value: Any) -> None:
    try:
        text = dumps(value)
    except SerializationError:
        return
    text.encode("utf-8")  # what a database stores: always valid UTF-8
    back = loads(text)
    assert back == as_json(value) or _has_nan(value)


def _has_nan(value: Any) -> bool:
    """Decimal NaN and float NaN are never equal to themselves."""
    if isinstance(value, float | Decimal):
        return value != value
    if isinstance(value, list | tuple):
        return any(_has_nan(item) for item in value)
    if isinstance(value, dict):
        return any(_has_nan(item) for item in value.values())
    return False


def test_a_long_timedelta_keeps_its_microseconds() -> None:
    for value in (timedelta(days=99421, microseconds=1), timedelta.max, timedelta.min):
        assert loads(dumps(value)) == value
    assert loads('{"$reliable":"timedelta","value":1.5}') == timedelta(seconds=1.5)


def test_rates_python_cannot_read_are_refused_naming_the_option() -> None:
    for text in ("1/.s", "1/.", "9" * 30 + "/s", "1/" + "9" * 5000 + "s"):
        with pytest.raises(ConfigError, match="rate_limit"):
            parse_rate(text, name="rate_limit")


def test_values_json_cannot_hold_are_refused_with_serialization_error() -> None:
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    for value in (math.nan, math.inf, 10**5000, {(1, 2): 3}, object(), nested, "\ud83d\ude00"):
        with pytest.raises(SerializationError):
            dumps(value)


def test_lone_surrogates_are_stored_escaped_and_come_back() -> None:
    for value in ("\ud800", "a\udfffb", {"\udc80": ["\ud800\x00"]}, "\udfff\ud800"):
        text = dumps(value)
        assert text.isascii() or "\\u" in text
        text.encode("utf-8")
        assert loads(text) == value


tag_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
tags = st.fixed_dictionaries(
    {
        "$reliable": st.sampled_from(
            [
                *("datetime", "date", "time", "timedelta", "uuid", "decimal", "bytes", "set"),
                *("dataclass", "pydantic", "pickle", "", "module:thing"),
            ]
        ),
        "value": tag_values,
    },
    optional={"type": st.text(max_size=20), "extra": tag_values},
)
stored = st.recursive(
    tags | tag_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@PROPERTY
@given(document=stored)
def test_stored_text_decodes_or_is_refused_with_serialization_error(document: Any) -> None:
    with contextlib.suppress(SerializationError):
        loads(json.dumps(document))


# -- HTTP parsers ----------------------------------------------------------------------

header_text = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=300)


@PROPERTY
@given(raw=header_text)
def test_an_idempotency_key_is_parsed_to_a_visible_key_or_refused(raw: str) -> None:
    try:
        key = parse_idempotency_key(raw)
    except InvalidIdempotencyKey:
        return
    assert 1 <= len(key) <= 255
    assert all(" " <= c <= "~" for c in key)


@PROPERTY
@given(key=st.text(st.sampled_from(string.printable[:94]), min_size=1, max_size=255))
def test_a_visible_key_is_read_bare_and_as_a_structured_string(key: str) -> None:
    if not key.startswith('"'):
        assert parse_idempotency_key(key) == key
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_idempotency_key(quoted) == key


@PROPERTY
@given(raw=st.one_of(st.none(), st.text(), st.from_regex(r"-?[0-9.eE+]{1,12}", fullmatch=True)))
def test_wait_is_seconds_up_to_a_minute_or_a_400(raw: str | None) -> None:
    answer = parse_wait(raw)
    if isinstance(answer, float):
        assert 0 <= answer <= 60
    else:
        assert (answer.status, dict(answer.headers)["content-type"]) == (400, PROBLEM)


# -- the same through apps -------------------------------------------------------------


@pytest.fixture
def rel(tmp_path: Path) -> Iterator[Reliable]:
    app = Reliable(f"sqlite:///{tmp_path / 'jobs.db'}", embedded_worker=False)
    yield app
    app.close()


def flask_app(rel: Reliable) -> Flask:
    app = Flask("hostile")
    ReliableFlask(app, rel)

    @app.post("/notes")
    @rel.offload(rate_limit=RateLimit(10_000, per="1h", key="json:customer.id"))
    def note() -> tuple[dict[str, Any], int]:
        body = request.get_data()
        return {"length": len(body), "hex": body[:64].hex()}, 201

    @app.post("/raw")
    @rel.offload
    def raw() -> tuple[dict[str, Any], int]:
        body = request.get_data()
        return {"length": len(body), "hex": body[:64].hex()}, 201

    return app


def starlette_app(rel: Reliable) -> Starlette:
    @rel.offload(rate_limit=RateLimit(10_000, per="1h", key="json:customer.id"))
    async def note(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"length": len(body), "hex": body[:64].hex()}, 201)

    @rel.offload
    async def raw(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"length": len(body), "hex": body[:64].hex()}, 201)

    return Starlette(
        routes=[Route("/notes", note, methods=["POST"]), Route("/raw", raw, methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )


@dataclass
class Poster:
    """POSTs to one framework's app (``/notes``, rate limited per ``json:customer.id``;
    ``/raw``, no key); answers as (status, content type, JSON body)."""

    framework: str
    client: FlaskClient | TestClient

    def post(
        self, body: bytes, headers: dict[str, str], path: str = "/notes"
    ) -> tuple[int, str, Any]:
        if isinstance(self.client, TestClient):
            raw = {name: value.encode("latin-1") for name, value in headers.items()}
            response = self.client.post(path, content=body, headers=raw)
            content_type = response.headers.get("content-type", "")
            return response.status_code, content_type, _json(response.content)
        answer = self.client.post(path, data=body, headers=headers)
        return answer.status_code, answer.content_type, _json(answer.get_data())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body


def make_poster(framework: str, rel: Reliable) -> Iterator[Poster]:
    if framework == "flask":
        yield Poster("flask", flask_app(rel).test_client())
        return
    with TestClient(starlette_app(rel), raise_server_exceptions=False) as client:
        yield Poster("starlette", client)


@pytest.fixture(params=["flask", "starlette"])
def poster(request: pytest.FixtureRequest, rel: Reliable) -> Iterator[Poster]:
    """On SQLite (the hypothesis tests make many requests)."""
    yield from make_poster(request.param, rel)


@pytest.fixture
def both_rel(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False)
    yield app
    app.close()


@pytest.fixture(params=["flask", "starlette"])
def both_poster(request: pytest.FixtureRequest, both_rel: Reliable) -> Iterator[Poster]:
    """On SQLite and on PostgreSQL, which refuses what SQLite takes (a NUL in text)."""
    yield from make_poster(request.param, both_rel)


def stored_jobs(rel: Reliable) -> int:
    return sum(rel.store.count_by_status().values())


def assert_answered(status: int, content_type: str, document: Any) -> None:
    """A 202 with its job, or a problem+json 4xx; never a 5xx."""
    if status == 202:
        assert document["status"] == "queued"
        return
    assert 400 <= status < 500, (status, document)
    assert content_type == PROBLEM and document["status"] == status


@HTTP
@given(key=header_text.filter(lambda v: v == v.strip(" \t") and "\r" not in v and "\n" not in v))
def test_any_idempotency_key_header_is_a_202_or_a_400(
    poster: Poster, rel: Reliable, key: str
) -> None:
    before = stored_jobs(rel)
    status, content_type, document = poster.post(
        b'{"customer": {"id": 1}}', {"Idempotency-Key": key, "Content-Type": "application/json"}
    )
    assert_answered(status, content_type, document)
    assert status in (202, 400)
    created = status == 202 and stored_jobs(rel) == before + 1
    assert created or stored_jobs(rel) == before


bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda value: b'{"customer": {"id": ' + value + b"}}",
        st.sampled_from(
            [
                *(b'"\\ud800"', b'"a\\u0000b"', b"1e999", b"NaN", b"-0", b"{}", b"null"),
                *(b'"' + b"\\udfff" * 70 + b'"', b"1" * 5000, b"[" * 5000 + b"]" * 5000),
                *(b'"\xff\xfe"', b"true"),
            ]
        ),
    ),
    st.builds(lambda text: text.encode("utf-8", "surrogatepass"), any_text),
)


@HTTP
@given(body=bodies)
def test_any_body_of_a_route_keyed_on_its_json_is_a_202_or_a_400(
    poster: Poster, rel: Reliable, body: bytes
) -> None:
    before = stored_jobs(rel)
    status, content_type, document = poster.post(body, {"Content-Type": "application/json"})
    assert_answered(status, content_type, document)
    assert status in (202, 400)
    assert stored_jobs(rel) == before + (status == 202)


def test_key_values_a_database_cannot_hold_are_stored_as_digests(
    both_poster: Poster, both_rel: Reliable
) -> None:
    """A lone surrogate or a NUL in a key value: accepted, counted under a digest."""
    for value in (b'"\\ud800"', b'"a\\u0000b"'):
        status, _, document = both_poster.post(b'{"customer": {"id": ' + value + b"}}", {})
        assert status == 202, document
    keys = {window["key"] for window in both_rel.flow_state()["rate_limits"]}
    assert len(keys) == 2 and all(key.startswith("sha256:") for key in keys)


def test_json_nested_too_deeply_for_a_json_key_is_a_400(poster: Poster, rel: Reliable) -> None:
    body = b'{"customer": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, content_type, document = poster.post(body, {"Content-Type": "application/json"})
    assert (status, content_type) == (400, PROBLEM), document
    assert stored_jobs(rel) == 0


SQL = "'; DROP TABLE reliable_jobs; --"


def test_sql_in_keys_and_bodies_is_data(both_poster: Poster, both_rel: Reliable) -> None:
    """Every value reaches the database as a bound parameter: SQL in an idempotency key,
    a limit key or a body is stored as the text it is, and runs nothing."""
    body = json.dumps({"customer": {"id": SQL}, "note": SQL}).encode()
    headers = {"Idempotency-Key": SQL.replace(" ", "_"), "Content-Type": "application/json"}
    status, _, first = both_poster.post(body, headers)
    assert status == 202, first
    status, _, again = both_poster.post(body, headers)
    assert (status, again["id"]) == (202, first["id"])  # found by its key: stored verbatim
    assert [w["key"] for w in both_rel.flow_state()["rate_limits"]] == [SQL]
    both_rel.run_until_idle()
    assert both_rel.get_job(first["id"]).result["body"]["length"] == len(body)


def test_a_body_that_is_not_utf8_reaches_the_handler_unchanged(
    poster: Poster, rel: Reliable
) -> None:
    body = b'{"customer": {"id": 7}, "note": "\xff\xfe\xc3"}'
    status, _, document = poster.post(body, {"Content-Type": "application/json"}, "/raw")
    assert status == 202, document
    rel.run_until_idle()
    result = rel.get_job(document["id"]).result
    assert result["status_code"] == 201
    assert result["body"] == {"length": len(body), "hex": body[:64].hex()}


def test_a_task_argument_json_cannot_hold_is_refused_and_stores_nothing(rel: Reliable) -> None:
    @rel.task
    def remember(value: Any) -> None: ...

    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    for value in (nested, math.nan, "\ud83d\ude00", object()):
        with pytest.raises(SerializationError, match="remember"):
            remember.enqueue(value)
    assert stored_jobs(rel) == 0
    handle = remember.enqueue({"name": "\udcff.txt", "at": datetime(2026, 1, 1), "id": UUID(int=1)})
    assert rel.store.get_status(handle.id) == "queued"


# -- truncated and abandoned bodies through real servers ---------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    with Servers(tmp_path, f"sqlite:///{tmp_path / 'served.db'}") as started:
        yield started


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["flask", "starlette"])
def test_a_body_cut_short_stores_nothing_and_the_server_goes_on(
    servers: Servers, framework: str
) -> None:
    [url] = servers.start(framework, 1)
    host = url.removeprefix("http://")
    head = (
        f"POST /orders/7/notes HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    ).encode()
    truncated = head + b"Content-Length: 1000\r\n\r\n" + b'{"customer": {"id": 1}, "x": "'
    abandoned = head + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b'{"customer": {"i'
    for request_bytes in (truncated, abandoned):
        answer = raw_request(url, request_bytes)
        assert not answer.startswith(b"HTTP/1.1 202"), answer
        assert not answer.startswith(b"HTTP/1.1 5"), answer
    whole = b'{"customer": {"id": 1}}'
    complete = head + f"Content-Length: {len(whole)}\r\nConnection: close\r\n\r\n".encode()
    answer = raw_request(url, complete + whole, half_close=False)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    client = Reliable(servers.database_url, embedded_worker=False)
    try:
        assert sum(client.store.count_by_status().values()) == 1
    finally:
        client.close()
    assert servers.tracebacks() == []


@pytest.mark.slow
def test_gunicorn_delivers_the_413_of_a_body_somewhat_over_the_limit(servers: Servers) -> None:
    """Flask reads and drops the rest of a refused body (up to 1 MiB more): gunicorn,
    which closes the connection after answering, would otherwise reset it while the
    client still sends, and the client would get the reset instead of the 413."""
    [url] = servers.start("flask", 1)
    oversized = b'{"customer": {"id": 1}, "pad": "' + b"x" * (MAX_PAYLOAD + 200_000) + b'"}'
    with httpx.Client(timeout=30) as client:
        answers = [
            client.post(f"{url}/orders/7/notes", content=oversized).status_code for _ in range(40)
        ]
    assert answers == [413] * 40
