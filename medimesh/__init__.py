"""MediMesh: hospitals learn a shared diagnosis model; patient rows never leave a hospital.

``medimesh.Client`` and ``medimesh.AsyncClient`` are the SDK for the oracle's HTTP API
(imported on first use, so the core does not pay for httpx).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncClient", "Client", "__version__"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        from medimesh import client

        return getattr(client, name)
    raise AttributeError(f"module 'medimesh' has no attribute {name!r}")
