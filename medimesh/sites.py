"""Site descriptors: the small recipe a hospital actor turns into its own patients.

The driver ships a descriptor (a seed and site index, or a file path), never arrays. The
hospital builds its data inside its own process by calling :func:`load_site`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.errors import ConfigError

__all__ = ["DatasetInfo", "LocalData", "SiteDescriptor", "dataset_info", "load_site"]

# Heart features that are already 0/1 and so are not standardized.
_HEART_BINARY = frozenset({"sex", "fbs", "exang", "chol_missing"})


@dataclass(frozen=True, slots=True)
class SiteDescriptor:
    """How to build one site's data: ``kind`` is "rare" or "heart"; params are JSON-able."""

    kind: str
    name: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LocalData:
    """One site's rows. Lives only inside its hospital actor (and in benchmark baselines)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    """Schema shared by the consortium: feature names, which to log/scale, class names."""

    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    log_mask: np.ndarray
    scale_mask: np.ndarray


def dataset_info(kind: str, params: dict[str, Any] | None = None) -> DatasetInfo:
    params = params or {}
    if kind == "rare":
        from medimesh.data import cohort

        feats = cohort.features()
        return DatasetInfo(
            feature_names=tuple(f.name for f in feats),
            class_names=cohort.class_names(),
            log_mask=np.array([f.kind == "lognormal" for f in feats]),
            scale_mask=np.array([f.kind != "binary" for f in feats]),
        )
    if kind == "heart":
        from medimesh.data import heart

        names = heart.feature_names(params.get("preprocessing", "flamby"))
        binary = {n for n in names if n in _HEART_BINARY or n.startswith(("cp_", "restecg_"))}
        return DatasetInfo(
            feature_names=names,
            class_names=("no disease", "disease"),
            log_mask=np.zeros(len(names), dtype=bool),
            scale_mask=np.array([n not in binary for n in names]),
        )
    raise ConfigError(f"unknown dataset {kind!r}; expected 'rare' or 'heart'")


def load_site(desc: SiteDescriptor) -> LocalData:
    """Build a site's rows from its descriptor (runs inside the hospital actor)."""
    if desc.kind == "rare":
        from medimesh.data import cohort

        cfg = cohort.CohortConfig(**desc.params["cohort"])
        s = cohort.make_site(cfg, int(desc.params["site"]))
        return LocalData(desc.name, s.x_train, s.y_train, s.x_test, s.y_test)
    if desc.kind == "heart":
        from medimesh.data import heart

        h = heart.load_center(
            Path(desc.params["data_dir"]),
            desc.params["center"],
            desc.params.get("preprocessing", "flamby"),
        )
        return LocalData(desc.name, h.x_train, h.y_train, h.x_test, h.y_test)
    raise ConfigError(f"unknown dataset {desc.kind!r}; expected 'rare' or 'heart'")
