"""Site descriptors: the small recipe a hospital actor turns into its own patients.

The driver ships a descriptor (a seed and site index, or a file path), never arrays. The
hospital builds its data inside its own process by calling :func:`load_site`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.errors import ConfigError

__all__ = ["DatasetInfo", "LocalData", "SiteDescriptor", "dataset_info", "load_site"]



@dataclass(frozen=True, slots=True)
class SiteDescriptor:
    """How to build one site's data: ``kind`` is rare, sparse, heart, csv or phenopackets;
    params JSON-able."""

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
    skipped_rows: int = 0
    unknown_codes: int = 0
    # Counts about the site's own files (e.g. a phenopacket directory's report); never rows.
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    """Schema shared by the consortium: feature names, which to log/scale, class names."""

    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    log_mask: np.ndarray
    scale_mask: np.ndarray


def dataset_info(kind: str, params: dict[str, Any] | None = None) -> DatasetInfo:
    params = params or {}
    if kind == "phenopackets":  # the consortium's spec columns, else the rare panel's
        kind = "csv" if params.get("spec") is not None else "rare"
    if kind == "rare":
        from medimesh.data import cohort

        n_diseases = int(params.get("cohort", {}).get("n_diseases", cohort.PANEL_SIZE))
        feats = cohort.features(n_diseases)
        return DatasetInfo(
            feature_names=tuple(f.name for f in feats),
            class_names=cohort.class_names(n_diseases),
            log_mask=np.array([f.kind == "lognormal" for f in feats]),
            scale_mask=np.array([f.kind != "binary" for f in feats]),
        )
    if kind == "sparse":
        from medimesh.data import sparse

        cfg = sparse.SparseConfig(**params["cohort"])
        n = len(sparse.feature_names(cfg))
        # Every column is a 0/1 HPO indicator: no log, no scaling (see "Binary features").
        return DatasetInfo(
            feature_names=sparse.feature_names(cfg),
            class_names=sparse.class_names(cfg),
            log_mask=np.zeros(n, dtype=bool),
            scale_mask=np.zeros(n, dtype=bool),
        )
    if kind == "heart":
        from medimesh.data import heart

        names = heart.feature_names(params.get("preprocessing", "flamby"))
        # Every heart column is standardized (indicators too), exactly as a CSV spec of
        # numeric columns would be: `medimesh train` on exported CSVs reproduces the bench.
        return DatasetInfo(
            feature_names=names,
            class_names=heart.CLASS_NAMES,
            log_mask=np.zeros(len(names), dtype=bool),
            scale_mask=np.ones(len(names), dtype=bool),
        )
    if kind == "csv":
        from medimesh.spec import load_spec

        spec = load_spec(params["spec"])
        return DatasetInfo(
            feature_names=spec.column_names(),
            class_names=spec.classes,
            log_mask=spec.log_mask(),
            scale_mask=spec.scale_mask(),
        )
    raise ConfigError(
        f"unknown dataset {kind!r}; expected 'rare', 'sparse', 'heart', 'csv' or 'phenopackets'"
    )


def load_site(desc: SiteDescriptor) -> LocalData:
    """Build a site's rows from its descriptor (runs inside the hospital actor)."""
    if desc.kind == "rare":
        from medimesh.data import cohort

        cfg = cohort.CohortConfig(**desc.params["cohort"])
        site = int(desc.params["site"])
        s = cohort.make_site(cfg, site)
        # The hospital's local recipe: shorter copies of its training records (issue 14).
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, site)))
        x_train, y_train = cohort.shortened_records(
            s.x_train, s.y_train, rng, cfg.short_record_copies, n_diseases=cfg.n_diseases
        )
        return LocalData(desc.name, x_train, y_train, s.x_test, s.y_test)
    if desc.kind == "sparse":
        from medimesh.data import sparse

        sp = sparse.make_site(
            sparse.SparseConfig(**desc.params["cohort"]), int(desc.params["site"])
        )
        return LocalData(desc.name, sp.x_train, sp.y_train, sp.x_test, sp.y_test)
    if desc.kind == "heart":
        from medimesh.data import heart

        h = heart.load_center(
            Path(desc.params["data_dir"]),
            desc.params["center"],
            desc.params.get("preprocessing", "flamby"),
        )
        return LocalData(desc.name, h.x_train, h.y_train, h.x_test, h.y_test)
    if desc.kind == "csv":
        return _load_csv_site(desc)
    if desc.kind == "phenopackets":
        return _load_phenopacket_site(desc)
    raise ConfigError(
        f"unknown dataset {desc.kind!r}; expected 'rare', 'sparse', 'heart', 'csv' or "
        "'phenopackets'"
    )


def _local_split(y: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Train/test row indices for a file-backed site (``test_fraction`` <= 0: all train)."""
    from medimesh.spec import split_site

    fraction = float(params.get("test_fraction", 0.3))
    if fraction <= 0:
        return np.arange(len(y)), np.zeros(0, dtype=np.int64)
    return split_site(y, fraction, int(params.get("seed", 0)))


def _load_csv_site(desc: SiteDescriptor) -> LocalData:
    """Encode this site's own CSV against the consortium spec and split it locally."""
    from medimesh.spec import encode_csv, load_spec

    p = desc.params
    spec = load_spec(p["spec"])
    site = encode_csv(Path(p["path"]), spec, skip_bad_rows=bool(p.get("skip_bad_rows", False)))
    if len(site.y) == 0:
        raise ConfigError(f"{desc.name}: {p['path']} has no usable rows")
    train, test = _local_split(site.y, p)
    return LocalData(
        desc.name,
        site.x[train],
        site.y[train],
        site.x[test],
        site.y[test],
        skipped_rows=len(site.skipped),
        unknown_codes=sum(site.unknown_codes.values()),
    )


def _load_phenopacket_site(desc: SiteDescriptor) -> LocalData:
    """Read this site's own directory of GA4GH phenopackets into the consortium's columns.

    Rare panel: each file goes through the oracle's request encoder, so a phenopacket trains
    exactly the columns it would set as a query. With a CSV spec: through the spec's own CSV
    encoders (``medimesh.phenopackets.spec_encoder``). Only counts leave.
    """
    from medimesh.hpo import HpoAncestors
    from medimesh.phenopackets import (
        LabelCodes,
        PhenopacketError,
        encode_directory,
        request_encoder,
        spec_encoder,
    )
    from medimesh.spec import load_spec

    p = desc.params
    codes = LabelCodes.from_dict(p["codes"])
    try:
        if p.get("spec") is not None:
            spec = load_spec(p["spec"])
            encoder, width = spec_encoder(spec, codes), len(spec.column_names())
        else:
            from medimesh.data import cohort

            encoder, width = request_encoder(HpoAncestors.load()), len(cohort.features())
        enc = encode_directory(Path(p["path"]), codes, encoder, width)
    except PhenopacketError as exc:
        raise ConfigError(f"{desc.name}: {exc}") from None
    report = enc.report.to_dict()
    if len(enc.y) == 0:
        raise ConfigError(f"{desc.name}: no usable phenopackets in {Path(p['path']).name} "
                          f"({report['files_read']} read, skipped {report['skipped']})")
    train, test = _local_split(enc.y, p)
    return LocalData(
        desc.name, enc.x[train], enc.y[train], enc.x[test], enc.y[test],
        skipped_rows=report["files_read"] - report["used"],
        unknown_codes=report["unknown_terms"],
        notes={"phenopackets": report},
    )
