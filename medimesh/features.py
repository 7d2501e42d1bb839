"""Federated standardization: every site scales features identically without pooling rows.

In the setup round each hospital reports only per-feature counts, sums and sums of squares
(over non-missing values) and its class counts. The coordinator adds them up into a global
mean and standard deviation and a class prior. Missing values (NaN) become the global mean,
i.e. zero after standardization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medimesh.errors import ConfigError

__all__ = ["LocalStats", "Standardizer", "combine_stats", "local_stats", "log_transform"]


def log_transform(x_raw: np.ndarray, log_mask: np.ndarray) -> np.ndarray:
    """Natural log of the log-normal columns (values <= 0 treated as missing); new array."""
    x = np.array(x_raw, dtype=np.float64, copy=True)
    if log_mask.any():
        cols = x[:, log_mask]
        with np.errstate(invalid="ignore", divide="ignore"):
            cols = np.where(cols > 0, np.log(np.where(cols > 0, cols, 1.0)), np.nan)
        x[:, log_mask] = cols
    return x


@dataclass(frozen=True, slots=True)
class LocalStats:
    """What one site reveals in the setup round: aggregates, never rows."""

    n_examples: int
    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray
    class_counts: np.ndarray


def local_stats(x: np.ndarray, y: np.ndarray, n_classes: int) -> LocalStats:
    present = ~np.isnan(x)
    filled = np.where(present, x, 0.0)
    return LocalStats(
        n_examples=len(y),
        count=present.sum(axis=0).astype(np.float64),
        total=filled.sum(axis=0),
        total_sq=(filled**2).sum(axis=0),
        class_counts=np.bincount(y, minlength=n_classes).astype(np.float64),
    )


@dataclass(frozen=True, slots=True)
class Standardizer:
    """Global per-feature mean and standard deviation."""

    mean: np.ndarray
    std: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        return np.where(np.isnan(z), 0.0, z)


def combine_stats(parts: Sequence[LocalStats]) -> tuple[Standardizer, np.ndarray]:
    """Global standardizer and class prior from the sites' setup statistics."""
    if not parts:
        raise ConfigError("the setup round needs statistics from at least one site")
    count = np.sum([p.count for p in parts], axis=0)
    total = np.sum([p.total for p in parts], axis=0)
    total_sq = np.sum([p.total_sq for p in parts], axis=0)
    safe = np.maximum(count, 1.0)
    mean = total / safe
    var = np.maximum(total_sq / safe - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std < 1e-8, 1.0, std)
    mean = np.where(count > 0, mean, 0.0)
    classes = np.sum([p.class_counts for p in parts], axis=0)
    prior = (classes + 1.0) / (classes.sum() + len(classes))
    return Standardizer(mean, std), prior
