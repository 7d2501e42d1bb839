"""Clinical metrics of ``bench accuracy``: ECE, disease patients called Other, symptom-only rows."""

from __future__ import annotations

import numpy as np
import pytest

from medimesh.bench.accuracy import clinical_report
from medimesh.bench.baselines import standardizer_for
from medimesh.data import cohort
from medimesh.metrics import ECE_BINS, clinical_scores, expected_calibration_error
from medimesh.model import Model
from medimesh.sites import LocalData, dataset_info


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    """Rows at 0.75 confidence of which 3 in 4 are right: calibrated, ECE 0."""
    proba = np.tile([0.75, 0.25], (8, 1))
    y = np.array([0, 0, 0, 1] * 2)
    assert expected_calibration_error(proba, y) == pytest.approx(0.0)
    assert ECE_BINS == 15


def test_ece_measures_overconfidence_per_bin() -> None:
    """Half the rows at 0.95 and all wrong, half at 0.55 and all right: 0.5*0.95 + 0.5*0.45."""
    proba = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    y = np.array([1] * 4 + [0] * 4)
    assert expected_calibration_error(proba, y) == pytest.approx(0.5 * 0.95 + 0.5 * 0.45)
    assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)) == 0.0


def test_clinical_scores_count_disease_patients_called_other() -> None:
    """Disease rows only for disease_*; Other's own rows do not count as misses."""
    other = 2
    proba = np.array([
        [0.8, 0.1, 0.1],  # disease 0, right
        [0.1, 0.2, 0.7],  # disease 1, called Other (right in top 3)
        [0.2, 0.3, 0.5],  # Other, right
        [0.6, 0.1, 0.3],  # Other, wrong
    ])
    y = np.array([0, 1, 2, 2])
    s = clinical_scores(proba, y, other)
    assert s["n"] == 4 and s["n_disease"] == 2
    assert s["top1"] == pytest.approx(0.5) and s["disease_top1"] == pytest.approx(0.5)
    assert s["disease_top3"] == pytest.approx(1.0)
    assert s["disease_called_other"] == pytest.approx(0.5)
    assert clinical_scores(proba, y, None)["disease_called_other"] is None


def test_clinical_report_scores_symptom_only_rows_of_the_same_patients() -> None:
    """A model that says "class 0" when a patient was sequenced and "Other" otherwise: the
    symptom-only view (nobody sequenced) calls every disease patient Other."""
    info = dataset_info("rare")
    cfg = cohort.CohortConfig(n_hospitals=2, seed=3)
    sites = [LocalData(s.name, s.x_train, s.y_train, s.x_test, s.y_test)
             for s in (cohort.make_site(cfg, i) for i in range(2))]
    std, _ = standardizer_for(sites, info)
    names = list(info.feature_names)
    k = len(info.class_names)
    w = np.zeros((len(names), k))
    w[names.index("genetic_testing_done"), 0] = 50.0
    bias = np.zeros(k)
    bias[k - 1] = 1.0  # "Other / none of these" unless sequenced
    report = clinical_report(Model(w, bias), sites, info, std)
    full, sym = report["full"], report["symptoms_only"]
    y = np.concatenate([s.y_test for s in sites])
    seq = np.vstack([s.x_test for s in sites])[:, names.index("genetic_testing_done")] == 1
    assert 0 < seq.mean() < 1
    assert full["n"] == sym["n"] == len(y) and full["n_disease"] == sym["n_disease"]
    assert full["top1"] == pytest.approx(np.mean(np.where(seq, y == 0, y == k - 1)))
    assert sym["top1"] == pytest.approx(np.mean(y == k - 1))
    sick = y != k - 1
    assert full["disease_called_other"] == pytest.approx(np.mean(~seq[sick]))
    assert sym["disease_called_other"] == pytest.approx(1.0)
