"""Aggregation rules: small pure functions over (update vectors, example counts).

No rule mutates its inputs. Updates are flattened model deltas of equal length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from medimesh.errors import ConfigError

__all__ = ["AGGREGATORS", "Aggregator", "fedavg", "flatten", "unflatten"]

Aggregator = Callable[[Sequence[np.ndarray], Sequence[float]], np.ndarray]


def _check(updates: Sequence[np.ndarray], weights: Sequence[float]) -> None:
    if not updates:
        raise ConfigError("aggregation needs at least one update")
    if len(updates) != len(weights):
        raise ConfigError("one weight per update is required")
    shape = updates[0].shape
    if any(u.shape != shape for u in updates):
        raise ConfigError("all updates must have the same shape")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("weights must be non-negative with a positive sum")


def fedavg(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Example-weighted mean (McMahan et al. 2017)."""
    _check(updates, weights)
    w = np.asarray(weights, dtype=np.float64)
    return np.asarray(np.tensordot(w / w.sum(), np.stack(updates), axes=1))


def flatten(delta_w: np.ndarray, delta_b: np.ndarray) -> np.ndarray:
    return np.concatenate([delta_w.ravel(), delta_b.ravel()]).astype(np.float64)


def unflatten(vec: np.ndarray, n_features: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    split = n_features * n_classes
    return vec[:split].reshape(n_features, n_classes), vec[split:]


AGGREGATORS: dict[str, Aggregator] = {"fedavg": fedavg}
