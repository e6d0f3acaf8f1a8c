"""The triage API fuzzed from its own OpenAPI document (schemathesis): whatever a client sends, no answer is
a server error, and every answer matches the schema the document gives for it. Bounded: a few dozen
generated requests per operation."""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from triage.http.app import create_app  # noqa: E402
from triage.settings import Settings  # noqa: E402

SECRET = "fuzz-" + "y" * 27
AUTH = {"Authorization": f"Bearer {SECRET}"}
EXAMPLES = 50  # generated requests per operation: a minute or two in all


@pytest.fixture(scope="module")
def fuzzed_app(bundle_dir: Path, cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from fastapi.testclient import TestClient

    folder = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(bundle=bundle_dir, database=f"sqlite:///{folder / 'db.sqlite'}", store=folder / "store", tokens=f"fuzzer={SECRET}"))
    image = next((cohort_dir / "jpeg" / "train").glob("*.jpg"))
    answer = TestClient(app).post("/api/v1/patients/P1/lesions", headers=AUTH, files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
    assert answer.status_code == 200, answer.text  # something to find: patient P1, lesion 1
    return app


def test_no_input_gets_a_server_error_and_every_answer_matches_its_schema(fuzzed_app) -> None:  # noqa: ANN001
    """Each operation of the document, fuzzed by schemathesis's Hypothesis strategies (seeded), every answer checked."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app, headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case) -> None:  # noqa: ANN001
            # an upload's schema says "binary", not "a decodable JPEG": schema-valid bytes may be refused (422)
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        check()
