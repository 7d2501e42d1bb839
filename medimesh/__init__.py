"""MediMesh: hospitals learn a shared diagnosis model; patient rows never leave a hospital.

The public API, imported on first use (so ``import medimesh`` stays cheap and Ray-free):

- SDK for the oracle's HTTP API: :class:`Client`, :class:`AsyncClient`.
- Running a consortium on Ray: :class:`RunConfig`, :class:`Consortium`.
- The model: :class:`Model`, :class:`TrainConfig`, :func:`train_local`, :func:`predict_proba`.
- Aggregation and server steps: :func:`make_aggregator`, :func:`rule_for_round`,
  :func:`make_server_optimizer`.
- The validator's judgement: :func:`score_round`, :func:`judge_round`, :class:`Policy`,
  :class:`Reputation`.
- Errors: :class:`MediMeshError` and its subclasses :class:`ConfigError`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Client": "medimesh.client",
    "AsyncClient": "medimesh.client",
    "RunConfig": "medimesh.run_config",
    "Consortium": "medimesh.actors.runtime",
    "Model": "medimesh.model",
    "TrainConfig": "medimesh.model",
    "train_local": "medimesh.model",
    "predict_proba": "medimesh.model",
    "make_aggregator": "medimesh.aggregation",
    "rule_for_round": "medimesh.aggregation",
    "make_server_optimizer": "medimesh.server_opt",
    "score_round": "medimesh.scoring",
    "judge_round": "medimesh.reputation",
    "Policy": "medimesh.reputation",
    "Reputation": "medimesh.reputation",
    "MediMeshError": "medimesh.errors",
    "ConfigError": "medimesh.errors",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medimesh' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return list(__all__)
