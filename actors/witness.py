"""Moved to :mod:`medimesh.witness_log` (no Ray in it; the node runtime uses it too)."""

from medimesh.witness_log import WitnessLog

__all__ = ["WitnessLog"]
