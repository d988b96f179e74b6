"""schemathesis against a FastAPI app's own OpenAPI document: the offloaded routes and
the job status resource (``GET``/``DELETE {prefix}/jobs/{job_id}``) answer every
generated request - valid or not - without a 5xx, with a status code, content type,
headers and body that the document declares.

There is no operator JSON API yet (the dashboard and the CLI come later); when there
is one, its operations belong here too. The status resource is also exercised with the
ids of real jobs (queued, succeeded, cancelled), not only random ones: schemathesis
follows the document's links from a route's 202 to its job, and the test draws from the
jobs it made.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from apps.api_fastapi import create_app
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.config import SchemathesisConfig

from reliable import NonRetriable, Reliable

EXAMPLES = 60


@pytest.fixture(scope="module")
def rel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reliable]:
    """No worker runs: every answer depends on the requests alone, as Hypothesis needs
    to replay a sequence. The jobs the routes accept stay queued."""
    folder = tmp_path_factory.mktemp("schema")
    app = Reliable(f"sqlite:///{folder / 'jobs.db'}", embedded_worker=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def known_jobs(rel: Reliable) -> list[str]:
    """Ids of real jobs in each final state: succeeded, failed, cancelled (``?wait=N``
    on a queued one would hold each request N seconds)."""

    @rel.task(name="schema-sample")
    def sample(n: int) -> int:
        if n == 2:
            raise NonRetriable("a failed job")
        return n

    done, failed = sample.enqueue(1), sample.enqueue(2)
    cancelled = sample.options(delay="1h").enqueue(3)
    rel.cancel(cancelled.id)
    rel.run_until_idle()
    assert [rel.get_job(job.id).status for job in (done, failed, cancelled)] == [
        "succeeded",
        "failed",
        "cancelled",
    ]
    return [done.id, failed.id, cancelled.id]


# DELETE on the status resource cancels the job, which stays readable as cancelled
# (SPEC §4): not the removal that schemathesis's use-after-free check expects.
CONFIG = SchemathesisConfig.from_dict({"checks": {"use_after_free": {"enabled": False}}})


@pytest.fixture(scope="module")
def api(rel: Reliable) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(rel), config=CONFIG)


# Every operation of the document; a new one must be added here (the test says so).
OPERATIONS = [
    "POST /orders/{order_id}/refunds",
    "POST /orders/{order_id}/notes",
    "GET /_reliable/jobs/{job_id}",
    "DELETE /_reliable/jobs/{job_id}",
]
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)


def test_the_document_has_the_operations_tested_here(api: Any, known_jobs: list[str]) -> None:
    labels = {result.ok().label for result in api.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_answers_as_documented(api: Any, known_jobs: list[str], label: str) -> None:
    """No 5xx, and the status code, content type, headers and body are the documented
    ones, for requests generated from the document (valid and invalid ones)."""
    operation = api.find_operation_by_label(label)

    @SETTINGS
    @hypothesis.given(case=operation.as_strategy(), data=st.data())
    def check(case: Case, data: st.DataObject) -> None:
        if "job_id" in (case.path_parameters or {}) and data.draw(st.booleans(), "a real job"):
            case.path_parameters = {"job_id": data.draw(st.sampled_from(known_jobs), "job")}
        case.call_and_validate()

    check()


def test_the_links_from_an_accepted_request_to_its_job_hold(
    api: Any, known_jobs: list[str]
) -> None:
    """Sequences that follow the document's links: a route's 202, then its job's status
    resource and its cancel, with the id the 202 gave."""

    class Workflow(api.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Case) -> None:
            # The job stays queued (no worker): ?wait=N would hold the request N s.
            if case.query and "wait" in case.query:
                case.query = {k: v for k, v in case.query.items() if k != "wait"}

    Workflow.run(settings=hypothesis.settings(SETTINGS, max_examples=20))


def test_the_status_resource_is_documented_with_its_refusals(api: Any, rel: Reliable) -> None:
    document = api.raw_schema
    status = document["paths"][f"{rel.settings.url_prefix}/jobs/{{job_id}}"]
    assert set(status["get"]["responses"]) >= {"200", "400", "404", "503"}
    assert set(status["delete"]["responses"]) >= {"200", "404", "409", "503"}
    refunds = document["paths"]["/orders/{order_id}/refunds"]["post"]["responses"]
    assert set(refunds) >= {"202", "400", "413", "422", "429", "503"}
    links = refunds["202"].get("links", {})
    assert {link["operationId"] for link in links.values()} == {
        "reliable_job_status",
        "reliable_cancel_job",
    }
