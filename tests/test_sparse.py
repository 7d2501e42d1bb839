"""The sparse HPO consortium: schema, determinism, true-path rule, skew, CSV path, metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medimesh.bench.accuracy import dominated_class_recall, dominated_classes
from medimesh.data import sparse
from medimesh.data.sparse import SparseConfig, make_site
from medimesh.hpo import HpoAncestors
from medimesh.sites import SiteDescriptor, dataset_info, load_site
from medimesh.spec import split_site

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = SparseConfig()


def _clear_caches() -> None:
    for fn in (sparse._plan, sparse._site_codes, sparse._columns):
        fn.cache_clear()


# ------------------------------------------------------------------------------ generator


def test_default_schema_is_large_and_sparse() -> None:
    """Defaults: >= 1,500 binary HPO columns, >= 70 Orphanet classes, ~10 recorded terms."""
    feats = sparse.feature_names(DEFAULT)
    names = sparse.class_names(DEFAULT)
    assert 1500 <= len(feats) <= DEFAULT.n_features
    assert len(names) == DEFAULT.n_classes >= 70 and len(set(names)) == len(names)
    assert all(f.startswith("HP:") for f in feats) and list(feats) == sorted(feats)
    assert not sparse.EXCLUDED_TERMS & set(feats)
    assert all(d.orpha_id.startswith("ORPHA:") for d in sparse.diseases(DEFAULT))
    site = make_site(DEFAULT, 0)
    assert site.name == "hospital-01"
    assert site.x_train.shape[1] == site.x_test.shape[1] == len(feats)
    assert set(np.unique(site.x_train)) <= {0.0, 1.0}
    assert site.y_train.min() >= 0 and site.y_train.max() < len(names)
    codes, _ = sparse.site_codes(DEFAULT, 0)
    assert 5 <= np.mean([len(c) for c in codes]) <= 20
    assert 0.01 < site.x_train.mean() < 0.1  # sparse, but not empty


def test_same_config_and_site_is_deterministic() -> None:
    """Rebuilding (config, site) from scratch gives bit-identical rows and splits."""
    cfg = SparseConfig(seed=4)
    a = make_site(cfg, 2)
    _clear_caches()
    b = make_site(cfg, 2)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_seed_changes_patients_not_diseases() -> None:
    """The disease panel is fixed (a disease is a disease); the seed changes the patients."""
    other = SparseConfig(seed=1)
    assert sparse.class_names(other) == sparse.class_names(DEFAULT)
    a, b = make_site(DEFAULT, 0), make_site(other, 0)
    assert a.x_train.shape != b.x_train.shape or not np.array_equal(a.x_train, b.x_train)


def test_every_observed_term_has_its_ancestors_set() -> None:
    """True-path rule: a patient's row is exactly the schema columns among its recorded codes
    and all their ancestors; so every set column's ancestors in the schema are set too."""
    hpo = HpoAncestors.load()
    feats = sparse.feature_names(DEFAULT)
    col = {t: j for j, t in enumerate(feats)}
    site = make_site(DEFAULT, 1)
    codes, y = sparse.site_codes(DEFAULT, 1)
    train, test = split_site(y, DEFAULT.test_fraction, DEFAULT.seed)
    x = np.zeros((len(y), len(feats)))
    x[train], x[test] = site.x_train, site.x_test
    for row, terms in zip(x[:100], codes[:100], strict=True):
        expected = {t for c in terms for t in (c, *hpo.ancestors(c)) if t in col}
        assert expected and {feats[j] for j in np.flatnonzero(row)} == expected
        for term in expected:
            assert {a for a in hpo.ancestors(term) if a in col} <= expected


def test_dirichlet_skew_puts_some_classes_at_one_site() -> None:
    """alpha = 0.3: several classes have >= 80 % of their patients at one site; alpha = 100
    spreads every class."""
    counts = sparse.site_class_counts(DEFAULT)
    assert counts.shape == (DEFAULT.n_classes, DEFAULT.n_hospitals)
    assert (counts.sum(axis=1) >= DEFAULT.min_class_rows).all()
    share = counts.max(axis=1) / counts.sum(axis=1)
    assert (share >= 0.8).sum() >= 3
    flat = sparse.site_class_counts(SparseConfig(alpha=100.0))
    assert (flat.max(axis=1) / flat.sum(axis=1) < 0.8).all()
    sizes = counts.sum(axis=0)
    assert sizes.min() >= 400 and sizes.max() <= 1000  # ~700 rows per site


def test_sites_differ_in_disease_mix() -> None:
    """Each pair of sites has clearly different class distributions (non-IID)."""
    counts = sparse.site_class_counts(DEFAULT).astype(float)
    mix = counts / counts.sum(axis=0, keepdims=True)
    for i in range(DEFAULT.n_hospitals):
        for j in range(i + 1, DEFAULT.n_hospitals):
            assert 0.5 * np.abs(mix[:, i] - mix[:, j]).sum() > 0.3


@pytest.mark.parametrize(
    ("field", "value"),
    [("alpha", 0.0), ("n_hospitals", 0), ("test_fraction", 1.0), ("recording_rate", 0.0),
     ("imprecision", 1.5), ("n_classes", 1)],
)
def test_bad_config_is_a_readable_error(field: str, value: float) -> None:
    """Out-of-range recipe fields raise ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        SparseConfig(**{field: value})  # type: ignore[arg-type]


# ------------------------------------------------------------------------ wiring and CSV


def test_descriptors_ship_only_the_recipe() -> None:
    """RunConfig(dataset="sparse") gives one JSON-able recipe per site; a site builds from it."""
    from medimesh.actors.runtime import RunConfig, site_descriptors

    descs = site_descriptors(RunConfig(dataset="sparse", hospitals=3, seed=2, alpha=0.3))
    assert [d.name for d in descs] == ["hospital-01", "hospital-02", "hospital-03"]
    assert all(d.kind == "sparse" and d.params["site"] == i for i, d in enumerate(descs))
    params = json.loads(json.dumps(descs[1].params))
    assert params["cohort"]["alpha"] == 0.3 and params["cohort"]["n_hospitals"] == 3
    info = dataset_info("sparse", params)
    cfg = SparseConfig(**params["cohort"])
    assert info.feature_names == sparse.feature_names(cfg)
    assert info.class_names == sparse.class_names(cfg)
    assert not info.log_mask.any() and not info.scale_mask.any()
    local = load_site(SiteDescriptor("sparse", "hospital-02", params))
    np.testing.assert_array_equal(local.x_train, make_site(cfg, 1).x_train)


def test_cli_alpha_default_is_per_dataset() -> None:
    """--alpha defaults to 0.3 for sparse and stays 0.5 for rare; an explicit value wins."""
    from medimesh.cli import _config, build_parser

    parser = build_parser()
    for argv, alpha in (
        (["bench", "accuracy", "--dataset", "sparse"], 0.3),
        (["bench", "accuracy"], 0.5),
        (["bench", "accuracy", "--dataset", "sparse", "--alpha", "1.5"], 1.5),
    ):
        assert _config(parser.parse_args(argv)).alpha == alpha


def test_data_sparse_command_writes_sites_the_csv_path_reads(tmp_path: Path) -> None:
    """`medimesh data sparse` writes spec + CSVs; the csv site path rebuilds identical rows
    and the identical split, and the printed train command names every file."""
    out = tmp_path / "consortium"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "medimesh.cli", "data", "sparse", "--out", str(out),
         "--hospitals", "3", "--seed", "5", "--alpha", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert run.returncode == 0, run.stderr
    command = run.stdout.strip()
    assert command.startswith("medimesh train --spec ") and "--seed 5" in command
    assert "--test-fraction 0.3" in command
    cfg = SparseConfig(n_hospitals=3, seed=5, alpha=0.5)
    spec = json.loads((out / "spec.json").read_text())
    assert spec["classes"] == list(sparse.class_names(cfg))
    for i in range(3):
        name = sparse.site_name(i)
        path = out / f"{name}.csv"
        assert f"{name}={path}" in command
        params = {"path": str(path), "spec": spec, "test_fraction": 0.3, "seed": 5}
        local = load_site(SiteDescriptor("csv", name, params))
        built = make_site(cfg, i)
        assert local.unknown_codes == 0 and local.skipped_rows == 0
        for field in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(local, field), getattr(built, field))
    csv_info = dataset_info("csv", {"spec": spec})
    assert csv_info.feature_names == sparse.feature_names(cfg)
    assert not csv_info.scale_mask.any()


# ------------------------------------------------------------------------------- metric


def test_dominated_class_recall_by_hand() -> None:
    """Hand-made case: classes 0 (4/5 at A), 3 (all at B) and 4 (all at A, no test rows)
    are dominated; 1 and 2 are not. Recalls and means as computed on paper."""
    train = [np.array([0, 0, 0, 0, 1, 2, 2, 4]), np.array([0, 1, 1, 2, 2, 3, 3])]
    assert dominated_classes(train, 5) == {0: (0, 0.8), 3: (1, 1.0), 4: (0, 1.0)}
    y_test = np.array([0, 0, 1, 3, 3, 3, 2])
    report = dominated_class_recall(
        train,
        ["A", "B"],
        ["c0", "c1", "c2", "c3", "c4"],
        y_test,
        {
            "federated": np.array([0, 1, 1, 3, 3, 0, 2]),
            "pooled": np.array([0, 0, 1, 3, 3, 3, 2]),
        },
        [np.array([0, 0, 1, 1, 1, 1, 2]), np.array([1, 1, 1, 3, 3, 3, 2])],
    )
    rows = {r["class"]: r for r in report["classes"]}
    assert list(rows) == ["c0", "c3", "c4"]
    assert rows["c0"]["dominant_site"] == "A" and rows["c3"]["dominant_site"] == "B"
    assert rows["c0"]["n_train"] == 5 and rows["c0"]["n_test"] == 2
    assert rows["c0"]["recall"] == {
        "federated": 0.5, "pooled": 1.0, "isolated_mean": 0.5, "isolated_dominant_site": 1.0,
    }
    assert rows["c3"]["recall"]["federated"] == pytest.approx(2 / 3)
    assert rows["c4"]["recall"]["federated"] is None and rows["c4"]["n_test"] == 0
    means = report["mean_recall"]
    assert means["federated"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert means["pooled"] == 1.0 and means["isolated_mean"] == 0.5
    assert means["isolated_dominant_site"] == 1.0
    assert report["federated_over_pooled"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert report["n_classes"] == 3 and report["n_classes_with_test_rows"] == 2


def test_dominated_class_recall_without_dominated_classes() -> None:
    """Evenly spread classes: nothing is dominated, means and ratio are None."""
    train = [np.array([0, 1]), np.array([0, 1])]
    report = dominated_class_recall(
        train, ["A", "B"], ["c0", "c1"], np.array([0, 1]),
        {"federated": np.array([0, 1]), "pooled": np.array([0, 1])},
    )
    assert report["classes"] == [] and report["federated_over_pooled"] is None
    assert report["mean_recall"] == {"federated": None, "pooled": None}


# ----------------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_hospitals_build_their_own_sparse_rows(ray_session: None) -> None:
    """Two hospital actors build their sparse rows from the recipe; one round trains."""
    from medimesh.actors.runtime import Consortium, RunConfig

    cfg = RunConfig(dataset="sparse", hospitals=2, rounds=1, alpha=0.3, round_timeout_s=60.0)
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
    finally:
        fed.shutdown()
    recipe = SparseConfig(n_hospitals=2, seed=0, alpha=0.3)
    n_train = sum(len(make_site(recipe, i).y_train) for i in range(2))
    assert fed.setup_summary["n_train"] == n_train
    assert len(history) == 1 and history[0]["accepted"] == 2
