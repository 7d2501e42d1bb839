"""Shared fixtures: one Ray instance for the whole test session (starting Ray costs ~5 s)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray with 2 CPUs and no dashboard, shared by every test that needs actors."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
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
    import uvicorn

    from medimesh.actors.oracle import OracleConfig, build_app
    from medimesh.bench.oracle import publish_model, train_quick_model
    from medimesh.store import Store, embedded_server

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
