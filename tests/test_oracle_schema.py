"""Schemathesis against the oracle's own OpenAPI spec: no 5xx, responses match the schema."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings


@pytest.fixture(scope="module")
def api_schema(live_oracle: str) -> Any:
    # /events streams until the client goes away; it has its own tests.
    return schemathesis.openapi.from_url(f"{live_oracle}/openapi.json").exclude(path="/events")


def test_api_conforms_to_its_schema(api_schema: Any) -> None:
    """Generated requests never get a 5xx and every response matches the documented schema."""
    checked = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: Any) -> None:
            case.call_and_validate()

        run()
        checked.append(operation.label)
    assert len(checked) >= 8, checked
