"""The synthetic rare cohort as CSV site files plus the feature spec that reads them back.

``medimesh demo --sites processes`` runs each hospital as ``medimesh node hospital``, which
reads only a CSV under the consortium's spec. This writes one CSV per site and a spec whose
encoded columns are exactly :func:`medimesh.data.cohort.features` in the same order (so the
oracle reads the model as it reads an in-Ray rare run): 0/1 columns become ``codes`` features
(present codes joined by ``|``), numeric ones ``numeric`` (``transform: log`` for lognormal
biomarkers; an empty cell is "not measured"). Every row is the site's own: the CSV holds the
generator's train rows, then its test rows; ``node hospital`` splits it again locally.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.data import cohort

__all__ = ["LABEL_COLUMN", "spec_dict", "write_sites"]

LABEL_COLUMN = "diagnosis"


def _group(name: str) -> str:
    """The codes feature a 0/1 column belongs to: HPO findings, ``excluded:``/``measured:``/
    ``gene:`` columns by prefix, any other indicator (e.g. ``sex_male``) on its own."""
    if name.startswith("HP:"):
        return "findings"
    prefix, sep, _ = name.partition(":")
    return prefix if sep else name


def _features(feats: Sequence[cohort.FeatureInfo]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in feats:
        if f.kind == "binary":
            key = _group(f.name)
            last = out[-1] if out else None
            if last is not None and last["type"] == "codes" and last["name"] == key:
                last["vocabulary"].append(f.name)
            else:
                out.append({"name": key, "type": "codes", "separator": "|",
                            "vocabulary": [f.name]})
            continue
        feature: dict[str, Any] = {"name": f.name, "type": "numeric"}
        if f.kind == "lognormal":
            feature["transform"] = "log"
        if f.unit:
            feature["unit"] = f.unit
        out.append(feature)
    return out


def spec_dict(n_diseases: int = cohort.PANEL_SIZE) -> dict[str, Any]:
    """The spec (docs/feature-spec.md) whose columns are the cohort's features, in order."""
    return {"label": LABEL_COLUMN, "classes": list(cohort.class_names(n_diseases)),
            "features": _features(cohort.features(n_diseases))}


def _cells(row: np.ndarray, spec: dict[str, Any]) -> list[str]:
    cells: list[str] = []
    col = 0
    for f in spec["features"]:
        if f["type"] == "codes":
            vocab = f["vocabulary"]
            values = row[col:col + len(vocab)]
            cells.append("|".join(c for c, v in zip(vocab, values, strict=True) if v > 0.5))
            col += len(vocab)
        else:
            v = float(row[col])
            cells.append("" if np.isnan(v) else repr(v))
            col += 1
    return cells


def write_sites(
    config: cohort.CohortConfig, out_dir: Path, names: Sequence[str] | None = None
) -> tuple[Path, tuple[tuple[str, Path], ...], tuple[int, ...]]:
    """Write ``spec.json`` and ``NAME.csv`` per site (``names``: default ``hospital-NN``).

    Returns (spec path, (name, path) per site, rows per site)."""
    names = list(names or [f"hospital-{i + 1:02d}" for i in range(config.n_hospitals)])
    if len(names) != config.n_hospitals:
        raise ValueError(f"{len(names)} names for {config.n_hospitals} hospitals")
    spec = spec_dict(config.n_diseases)
    classes = spec["classes"]
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    header = ["patient_id", *(f["name"] for f in spec["features"]), LABEL_COLUMN]
    sites: list[tuple[str, Path]] = []
    rows: list[int] = []
    for i, name in enumerate(names):
        s = cohort.make_site(config, i)
        x = np.vstack([s.x_train, s.x_test])
        y = np.concatenate([s.y_train, s.y_test])
        path = out_dir / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for j, (row, label) in enumerate(zip(x, y.tolist(), strict=True)):
                w.writerow([f"{name}-p{j:04d}", *_cells(row, spec), classes[label]])
        sites.append((name, path))
        rows.append(len(y))
    return spec_path, tuple(sites), tuple(rows)
