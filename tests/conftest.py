"""Shared fixtures: one Ray instance for the whole test session (starting Ray costs ~5 s)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray with 2 CPUs, shared by every test that needs actors.

    With the dashboard, as the demo starts it (tests/test_metrics.py reads a metric through
    it), on a free loopback port so parallel sessions on one machine do not collide. The
    dashboard agent (which also serves the metrics) runs either way; the dashboard adds its
    head and the head's module processes, mostly idle (`medimesh bench rounds --ray-dashboard
    --json` against the same without compares startup).
    """
    import ray

    from medimesh.actors.runtime import choose_auth_mode

    if not ray.is_initialized():
        choose_auth_mode(os.environ)  # as the CLI does: tokens on, without Ray's notice
        ray.init(
            address="local",  # always a fresh instance, never a cluster someone else started
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_free_port(),
            log_to_driver=False,
            namespace="medimesh",
            configure_logging=False,
        )
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def live_oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real oracle (uvicorn, real PostgreSQL with a published model) on a free port."""
    from medimesh.actors.oracle import OracleConfig, build_app
    from medimesh.bench.oracle import publish_model, quick_finding_hist, train_quick_model
    from medimesh.store import Store, embedded_server

    server = embedded_server(Path(tmp_path_factory.mktemp("schema")) / "pg")
    url = server.get_uri()

    from medimesh.bench.oracle import bench_signed_roster

    # publish_model also writes the model's signed model_published entry (a non-empty trail,
    # which the README verifies), signed by the members of this roster.
    roster_file = Path(tmp_path_factory.mktemp("roster")) / "roster.json"
    roster_file.write_text(bench_signed_roster())

    async def seed() -> None:
        store = await Store.open(url)
        try:
            model, mean, std = train_quick_model(steps=60)
            await publish_model(store, model, mean, std, 1, finding_hist=quick_finding_hist())
        finally:
            await store.close()

    asyncio.run(seed())
    config = OracleConfig(url, poll_interval=0.5, load_ontology=False,
                          roster_path=str(roster_file))
    with _serve(build_app(config)) as base:
        yield base
    server.cleanup()


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """Run an ASGI app (the oracle) on uvicorn in a thread until it answers /ready."""
    import uvicorn

    port = _free_port()
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
    try:
        yield base
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_app() -> Callable[[Any], contextlib.AbstractContextManager[str]]:
    """``with serve_app(app) as base_url:`` — an oracle app served for the block."""
    return _serve


# ----------------------------------------------------------------------- PostgreSQL (pgserver)


def _start_pg(path: Path) -> Any:
    """Start pgserver in ``path``; skip only if it truly cannot start, never under CI."""
    from medimesh.store import embedded_server

    try:
        return embedded_server(path)
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            pytest.fail(f"embedded PostgreSQL did not start: {exc!r}")
        pytest.skip(f"embedded PostgreSQL did not start: {exc!r}")


@pytest.fixture(scope="session")
def start_pg() -> Callable[[Path], Any]:
    """The starter itself, for tests that stop and restart their own server."""
    return _start_pg


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One embedded PostgreSQL for the session; tests get their own databases on it."""
    server = _start_pg(tmp_path_factory.mktemp("pg") / "data")
    yield server
    server.cleanup()


async def _create_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
def url(pg: Any) -> str:
    """A fresh, empty database on the session's server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(pg.get_uri(), name))
    return str(pg.get_uri(name))
