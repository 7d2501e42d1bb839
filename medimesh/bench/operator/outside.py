"""Operator attacks: outside (issue 15); see the package docstring."""

from __future__ import annotations

from medimesh.bench.operator import Scenario

SCENARIOS: dict[str, Scenario] = {}
