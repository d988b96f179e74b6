"""Load through real servers: gunicorn (Flask) and uvicorn (Starlette), three processes each.

- SPEC §9.4: a hundred clients sending one ``Idempotency-Key`` at the same instant get
  one job, all of them its 202, and exactly one of them is the one that created it.
- SPEC §9.6 and §4: a thousand mixed requests (four tenants under a rate limit of 50
  per hour each, with and without idempotency keys, malformed keys, oversized bodies)
  spread over the server processes: exactly 50 admitted per tenant, every refusal the
  documented answer, and the jobs stored are exactly those admitted.

Each test prints its figures (requests per second, latency percentiles).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import MAX_PAYLOAD, TIMEOUT, Servers

from reliable import Reliable

pytestmark = pytest.mark.slow

FRAMEWORKS = ["flask", "starlette"]
SERVER_PROCESSES = 3
EXPORTS_PER_HOUR = 50  # tests/apps/load_*.py


@pytest.fixture
def servers(tmp_path: Path, db_url: str) -> Iterator[Servers]:
    with Servers(tmp_path, db_url) as started:
        yield started


@pytest.fixture
def client(db_url: str) -> Iterator[Reliable]:
    app = Reliable(db_url, embedded_worker=False)
    yield app
    app.close()


def jobs_of(client: Reliable) -> Counter[str]:
    """Jobs stored, by task."""
    with client.store.engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT task, count(*) AS n FROM reliable_jobs GROUP BY task"
        ).all()
        connection.rollback()
    return Counter({row.task: int(row.n) for row in rows})


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def figures(name: str, seconds: float, latencies: list[float]) -> str:
    return (
        f"{name}: {len(latencies)} requests in {seconds:.2f}s "
        f"({len(latencies) / seconds:.0f}/s), latency p50 {percentile(latencies, 0.5) * 1000:.1f}"
        f" ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms"
    )


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_hundred_concurrent_clients_on_one_idempotency_key_make_one_job(
    servers: Servers,
    client: Reliable,
    framework: str,
    db_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    urls = servers.start(framework, SERVER_PROCESSES)
    callers = 100
    barrier = threading.Barrier(callers)
    answers: list[tuple[int, str, str | None, float]] = []
    lock = threading.Lock()

    with httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_connections=callers)) as http:

        def refund(index: int) -> None:
            url = f"{urls[index % len(urls)]}/orders/7/refunds"
            barrier.wait(TIMEOUT)
            began = time.monotonic()
            response = http.post(
                url, json={"amount_cents": 500}, headers={"Idempotency-Key": "refund-7"}
            )
            job = response.json().get("id", "") if response.status_code == 202 else response.text
            with lock:
                answers.append(
                    (
                        response.status_code,
                        job,
                        response.headers.get("idempotent-replayed"),
                        time.monotonic() - began,
                    )
                )

        threads = [threading.Thread(target=refund, args=(i,)) for i in range(callers)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 2)
        seconds = time.monotonic() - began

    assert len(answers) == callers, servers.logs()
    assert Counter(status for status, *_ in answers) == {202: callers}, answers
    assert len({job for _, job, _, _ in answers}) == 1, answers
    assert sorted(replayed or "" for _, _, replayed, _ in answers) == ["", *["true"] * 99]
    assert jobs_of(client) == {"refund": 1}
    assert servers.tracebacks() == []
    name = f"{framework} on {db_url.partition(':')[0]}, one key"
    with capsys.disabled():
        print(f"\n{figures(name, seconds, [a[3] for a in answers])}")


def mixed_requests() -> list[tuple[str, dict[str, str], bytes]]:
    """A thousand requests to ``POST /exports``: (tenant, headers, body).

    Four tenants send 220 well-formed requests each, half of them with an idempotency
    key of their own; 60 carry a malformed key and 60 a body over the limit.
    """
    requests: list[tuple[str, dict[str, str], bytes]] = []
    for tenant in ("acme", "globex", "initech", "umbrella"):
        for n in range(220):
            headers = {"X-Tenant": tenant, "Content-Type": "application/json"}
            if n % 2:
                headers["Idempotency-Key"] = f"{tenant}-export-{n}"
            requests.append((tenant, headers, b'{"format": "csv"}'))
    for n in range(60):
        headers = {"X-Tenant": "acme", "Idempotency-Key": f"bad key {n}"}
        requests.append(("malformed", headers, b"{}"))
    for _ in range(60):
        oversized = b'{"pad": "' + b"x" * MAX_PAYLOAD + b'"}'
        headers = {"X-Tenant": "globex", "Content-Type": "application/json"}
        requests.append(("oversized", headers, oversized))
    # Interleaved, so every kind reaches every server while the others are in flight.
    return (
        requests[::7]
        + requests[1::7]
        + requests[2::7]
        + requests[3::7]
        + requests[4::7]
        + (requests[5::7] + requests[6::7])
    )


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_thousand_mixed_requests_admit_exactly_the_rate_limit(
    servers: Servers,
    client: Reliable,
    framework: str,
    db_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    urls = servers.start(framework, SERVER_PROCESSES)
    requests = mixed_requests()
    assert len(requests) == 1000

    def send(http: httpx.Client, index: int) -> tuple[str, httpx.Response, float]:
        tenant, headers, body = requests[index]
        began = time.monotonic()
        response = http.post(f"{urls[index % len(urls)]}/exports", content=body, headers=headers)
        return tenant, response, time.monotonic() - began

    with (
        httpx.Client(timeout=TIMEOUT, limits=httpx.Limits(max_connections=50)) as http,
        ThreadPoolExecutor(50) as pool,
    ):
        began = time.monotonic()
        results = list(pool.map(lambda i: send(http, i), range(len(requests))))
        seconds = time.monotonic() - began

    by_kind: dict[str, Counter[int]] = {}
    for tenant, response, _ in results:
        by_kind.setdefault(tenant, Counter())[response.status_code] += 1
    admitted = {t: EXPORTS_PER_HOUR for t in ("acme", "globex", "initech", "umbrella")}
    assert by_kind == {
        **{t: Counter({202: n, 429: 220 - n}) for t, n in admitted.items()},
        "malformed": Counter({400: 60}),
        "oversized": Counter({413: 60}),
    }, servers.logs()
    assert jobs_of(client) == {"export": 4 * EXPORTS_PER_HOUR}
    windows = {w["key"]: w["used"] for w in client.flow_state()["rate_limits"]}
    assert windows == admitted
    for _, response, _ in results:
        assert_documented(response)
    assert servers.tracebacks() == []
    name = f"{framework} on {db_url.partition(':')[0]}, mixed"
    with capsys.disabled():
        print(f"\n{figures(name, seconds, [r[2] for r in results])}")


def assert_documented(response: httpx.Response) -> None:
    """Each answer as SPEC §4 has it: a 202 with its job, the refusals as problem+json."""
    document: Any = response.json()
    if response.status_code == 202:
        assert response.headers["location"] == document["status_url"]
        assert response.headers["ratelimit-policy"].startswith('"export";q=50;w=3600')
        return
    assert response.headers["content-type"] == "application/problem+json"
    assert document["status"] == response.status_code
    if response.status_code == 429:
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["ratelimit"].endswith(";r=0;t=" + response.headers["retry-after"])
