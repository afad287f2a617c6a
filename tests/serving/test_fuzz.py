"""Schemathesis against the live app on the tiny model: no input gives a 5xx, and every answer matches the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from core.job_store import JobStore
from scalpel.demo import BackgroundServer
from scalpel.jobs.routes import training_router
from scalpel.jobs.runner import JobRunner
from serving.app import DEFAULT_ROUTERS, create_app
from tests.serving.test_app import engine, tiny_home  # noqa: F401  (module-scoped fixtures, one instance here)

EXAMPLES_PER_OPERATION = 60
MIN_CASES = 1000


@pytest.fixture(scope="module")
def live(engine):  # noqa: F811
    store = JobStore()  # its runner never starts: a job the fuzz manages to submit stays queued
    app = create_app(engine, routers=(*DEFAULT_ROUTERS, training_router(store, JobRunner(store))))
    with BackgroundServer(app) as server:
        yield app, server.base_url.removesuffix("/v1")


def test_no_input_gives_a_5xx_or_an_undocumented_answer(live):
    app, root = live
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {(m.lower(), r.path) for r in app.routes if hasattr(r, "methods") for m in r.methods}
    assert {(op.method.lower(), op.path) for op in operations} >= documented - {
        ("get", "/openapi.json"),
        ("get", "/docs"),
        ("get", "/docs/oauth2-redirect"),
        ("get", "/redoc"),
        ("head", "/openapi.json"),
        ("head", "/docs"),
        ("head", "/docs/oauth2-redirect"),
        ("head", "/redoc"),
    }
    cases = 0
    failures: list[str] = []
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            nonlocal cases
            cases += 1
            if case.query and "max_tokens" in case.query:
                case.query["max_tokens"] = 1
            for limit in ("max_tokens", "max_output_tokens"):
                if isinstance(case.body, dict) and case.body.get(limit):
                    case.body[limit] = 1  # a valid generation stays short
            response = case.call(base_url=root, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")
                return
            try:
                case.validate_response(
                    response,
                    checks=[response_schema_conformance, status_code_conformance],
                )
            except (Exception, FailureGroup) as exc:  # collected, so one run reports every operation that fails
                failures.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {str(exc)[:300]}")

        fuzz()
    print(f"schemathesis: {cases} cases over {len(operations)} operations")
    assert not failures, "\n".join(failures[:20])
    assert cases >= MIN_CASES, cases
