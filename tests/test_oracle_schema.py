"""Schemathesis against the oracle's own OpenAPI spec: no 5xx, responses match the schema."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

Path = tuple[str | int, ...]

# What Python's json parser reads but a schema cannot describe, so schemathesis never
# generates it: non-finite numbers, lone surrogates (in values and in keys) and booleans
# (which lax validation reads as numbers). Each must be refused (422), never a 500.
HOSTILE: tuple[Any, ...] = (
    math.nan, math.inf, -math.inf, True, False, "\ud800", "HP:\udfff", {"\udc00": math.nan},
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


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
    assert len(checked) >= 10, checked
    assert {"GET /runs", "GET /baselines", "GET /rounds"} <= set(checked), checked


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _paths(schema: dict[str, Any], root: dict[str, Any], at: Path = ()) -> list[Path]:
    """Every place a value sits in a body of this schema: the body, each property, item 0."""
    schema = _resolve(schema, root)
    out = [at]
    for alt in schema.get("anyOf", []):
        out += _paths(alt, root, at)
    for name, sub in schema.get("properties", {}).items():
        out += _paths(sub, root, (*at, name))
    if "items" in schema:
        out += _paths(schema["items"], root, (*at, 0))
    return list(dict.fromkeys(out))


def _boolean_paths(schema: dict[str, Any], root: dict[str, Any], at: Path = ()) -> set[Path]:
    """Paths whose schema admits a JSON boolean (e.g. ``sequenced``): there true/false are
    legitimate values, not hostile ones."""
    schema = _resolve(schema, root)
    out = {at} if schema.get("type") == "boolean" else set()
    for alt in schema.get("anyOf", []):
        out |= _boolean_paths(alt, root, at)
    for name, sub in schema.get("properties", {}).items():
        out |= _boolean_paths(sub, root, (*at, name))
    if "items" in schema:
        out |= _boolean_paths(schema["items"], root, (*at, 0))
    return out


def _hostile_at(at: Path, value: Any, booleans: set[Path]) -> bool:
    """Whether ``value`` is hostile at ``at`` (a boolean is not, where booleans belong)."""
    return not (isinstance(value, bool) and at in booleans)


def _put(node: Any, at: Path, value: Any) -> Any:
    """A copy of ``node`` with ``value`` at ``at``, creating the containers on the way."""
    if not at:
        return value
    head, rest = at[0], at[1:]
    if isinstance(head, int):
        items = list(node) if isinstance(node, list) and node else [None]
        items[0] = _put(items[0], rest, value)
        return items
    obj = dict(node) if isinstance(node, dict) else {}
    obj[head] = _put(obj.get(head), rest, value)
    return obj


def _diagnose(api_schema: Any) -> tuple[Any, list[Path], dict[str, Any], set[Path]]:
    """/diagnose's operation, every field path in its body, its documented example and the
    paths where a boolean is a legitimate value."""
    operation = api_schema["/diagnose"]["POST"]
    raw = api_schema.raw_schema
    body = raw["paths"]["/diagnose"]["post"]["requestBody"]["content"]["application/json"]
    model = _resolve(body["schema"], raw)
    return operation, _paths(model, raw), model["examples"][0], _boolean_paths(model, raw)


def _send_hostile(operation: Any, body: Any) -> None:
    """Post ``body`` as the bytes Python's json writes (NaN, \\ud800 …); expect a clean 422."""
    raw = json.dumps(body, allow_nan=True).encode()
    case = operation.Case(body=raw, media_type="application/json")
    response = case.call()
    case.validate_response(response, checks=CHECKS)
    assert response.status_code == 422, (raw, response.status_code, response.text)


def test_every_diagnose_field_refuses_hostile_json(api_schema: Any) -> None:
    """Each hostile value in each field of /diagnose's schema: a documented 422, never 5xx."""
    operation, paths, example, booleans = _diagnose(api_schema)
    assert ("age",) in paths and ("symptoms", 0) in paths
    assert ("excluded_symptoms", 0) in paths and booleans == {("sequenced",)}
    assert sum(p[-1:] == ("value",) for p in paths) >= 5, paths  # one per panel biomarker
    for at in paths:
        for value in HOSTILE:
            if _hostile_at(at, value, booleans):
                _send_hostile(operation, _put(example, at, value))


def test_generated_bodies_with_hostile_values_are_refused(api_schema: Any) -> None:
    """Schemathesis's own bodies with hostile values mixed in: still a documented 422."""
    operation, paths, _, booleans = _diagnose(api_schema)
    hostile = st.tuples(st.sampled_from(paths), st.sampled_from(HOSTILE)).filter(
        lambda pv: _hostile_at(pv[0], pv[1], booleans)
    )

    @given(case=operation.as_strategy(), mix=st.lists(hostile, min_size=1, max_size=3))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def run(case: Any, mix: list[tuple[Path, Any]]) -> None:
        body = case.body
        for at, value in mix:
            body = _put(body, at, value)
        _send_hostile(operation, body)

    run()
