"""Schemathesis against the oracle's own OpenAPI spec: no 5xx, responses match the schema."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings

from medimesh.actors.oracle import OracleConfig, build_app
from medimesh.bench.oracle import publish_model, train_quick_model
from medimesh.store import Store, embedded_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real oracle (uvicorn, real PostgreSQL with a published model) on a free port."""
    server = embedded_server(Path(tmp_path_factory.mktemp("schema")) / "pg")
    url = server.get_uri()

    async def seed() -> None:
        store = await Store.open(url)
        try:
            model, mean, std = train_quick_model(steps=60)
            await publish_model(store, model, mean, std, 1)
        finally:
            await store.close()

    asyncio.run(seed())
    port = _free_port()
    app = build_app(OracleConfig(url, poll_interval=0.5, load_ontology=False))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    yield base
    uv.should_exit = True
    thread.join(timeout=10)
    server.cleanup()


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> Any:
    # /events streams until the client goes away; it has its own tests.
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json").exclude(path="/events")


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
