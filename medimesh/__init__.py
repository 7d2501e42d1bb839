"""MediMesh: hospitals learn a shared diagnosis model; patient rows never leave a hospital."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
