"""Pooled and isolated baselines trained on exactly the federated run's splits.

This is an experiment harness, not part of the federation: to compute the pooled upper bound
it must pool rows, so it rebuilds every site from its descriptor in the benchmark process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medimesh.features import Standardizer, combine_stats, local_stats, log_transform
from medimesh.model import Model, TrainConfig, init_model, train_local
from medimesh.sites import DatasetInfo, LocalData

__all__ = ["Prepared", "fit_centralized", "prepare", "standardizer_for"]


@dataclass(frozen=True, slots=True)
class Prepared:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def standardizer_for(
    sites: Sequence[LocalData], info: DatasetInfo
) -> tuple[Standardizer, np.ndarray]:
    """The same global statistics the setup round computes, from the same local sums."""
    k = len(info.class_names)
    stats = [local_stats(log_transform(s.x_train, info.log_mask), s.y_train, k) for s in sites]
    std, prior = combine_stats(stats)
    mask = info.scale_mask
    return Standardizer(np.where(mask, std.mean, 0.0), np.where(mask, std.std, 1.0)), prior


def prepare(site: LocalData, info: DatasetInfo, std: Standardizer) -> Prepared:
    tr = std.apply(log_transform(site.x_train, info.log_mask))
    te = std.apply(log_transform(site.x_test, info.log_mask))
    return Prepared(site.name, tr, site.y_train, te, site.y_test)


def fit_centralized(
    x: np.ndarray, y: np.ndarray, n_classes: int, prior: np.ndarray, cfg: TrainConfig, steps: int
) -> Model:
    """Train the same model family to convergence on one site's (or the pooled) rows."""
    model = init_model(x.shape[1], n_classes, prior)
    full = TrainConfig(epochs=steps, lr=cfg.lr, l2=cfg.l2)
    return train_local(model, x, y, full)
