"""Shared fixtures: one Ray instance for the whole test session (starting Ray costs ~5 s)."""

from __future__ import annotations

from collections.abc import Iterator

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
