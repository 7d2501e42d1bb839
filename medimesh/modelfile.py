"""A trained model on disk: weights, schema, standardization, hash and provenance.

``model.json`` is plain JSON (no pickle): everything needed to score a new table with the
same preprocessing the federation used — the feature spec, the global mean and standard
deviation from the setup round, and which columns are logged and scaled. Loading recomputes
the model hash and refuses a file whose weights do not match it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.errors import ConfigError
from medimesh.features import Standardizer, log_transform
from medimesh.model import Model, model_hash, predict_proba

__all__ = ["FORMAT", "SavedModel", "load_model", "save_model"]

FORMAT = "medimesh-model/v1"


@dataclass(frozen=True, slots=True)
class SavedModel:
    model: Model
    model_hash: str
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    log_mask: np.ndarray
    scale_mask: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    spec: dict[str, Any] | None
    provenance: list[dict[str, Any]]
    round: int

    def prepare(self, x_raw: np.ndarray) -> np.ndarray:
        """Raw rows → model inputs, exactly as hospitals prepared their own rows."""
        std = Standardizer(
            np.where(self.scale_mask, self.mean, 0.0), np.where(self.scale_mask, self.std, 1.0)
        )
        return std.apply(log_transform(x_raw, self.log_mask))

    def predict_proba(self, x_raw: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, self.prepare(x_raw))


def save_model(
    out_dir: Path,
    final: dict[str, Any],
    classes: tuple[str, ...],
    feature_names: tuple[str, ...],
    log_mask: np.ndarray,
    scale_mask: np.ndarray,
    spec: dict[str, Any] | None,
    history: list[dict[str, Any]],
) -> Path:
    """Write ``out_dir/model.json``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "model_hash": final["model_hash"],
        "round": final["round"],
        "saved_at": time.time(),
        "classes": list(classes),
        "feature_names": list(feature_names),
        "log_mask": [bool(v) for v in log_mask],
        "scale_mask": [bool(v) for v in scale_mask],
        "mean": np.asarray(final["mean"], dtype=float).tolist(),
        "std": np.asarray(final["std"], dtype=float).tolist(),
        "weights": np.asarray(final["weights"], dtype=np.float32).tolist(),
        "bias": np.asarray(final["bias"], dtype=np.float32).tolist(),
        "spec": spec,
        "provenance": [
            {k: m[k] for k in ("round", "model_hash", "parent_hash", "accepted", "rejected")}
            for m in history
        ],
    }
    path = out_dir / "model.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    tmp.replace(path)  # never leave a half-written model behind
    return path


def load_model(model_dir: Path) -> SavedModel:
    path = model_dir / "model.json" if model_dir.is_dir() else model_dir
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no model at {path} (expected a directory written by train)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if doc.get("format") != FORMAT:
        raise ConfigError(f"{path}: unsupported model format {doc.get('format')!r}")
    model = Model(np.array(doc["weights"], dtype=np.float32), np.array(doc["bias"], np.float32))
    if model_hash(model) != doc["model_hash"]:
        raise ConfigError(f"{path}: weights do not match model_hash {doc['model_hash'][:12]}…")
    return SavedModel(
        model=model,
        model_hash=doc["model_hash"],
        classes=tuple(doc["classes"]),
        feature_names=tuple(doc["feature_names"]),
        log_mask=np.array(doc["log_mask"], dtype=bool),
        scale_mask=np.array(doc["scale_mask"], dtype=bool),
        mean=np.array(doc["mean"], dtype=float),
        std=np.array(doc["std"], dtype=float),
        spec=doc.get("spec"),
        provenance=list(doc.get("provenance", [])),
        round=int(doc["round"]),
    )
