"""Explanations, the out-of-distribution flag and next tests on tiny hand-computable models.

The tiny engine: classes (Disease, Other), four inputs — two symptoms, one log-normal lab and
one gene — with weights chosen so every number below can be checked on paper.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from medimesh import explain
from medimesh.data.cohort import FeatureInfo
from medimesh.diagnosis import DiagnosisEngine, Measurement, PatientRequest
from medimesh.explain import (
    FINDING_BINS,
    TrainingProfile,
    candidate_shares,
    check_ood,
    combine_finding_hists,
    count_findings,
    effect_words,
    finding_histogram,
    fmt_number,
    fmt_odds,
    fmt_pct,
    gap_swing,
)
from medimesh.model import Model, model_hash
from medimesh.modelfile import SavedModel
from medimesh.protocol import SetupStats

FEATURES = (
    FeatureInfo("HP:0000001", "binary", "Sign A", "", None),
    FeatureInfo("HP:0000002", "binary", "Sign B", "", None),
    FeatureInfo("lab", "lognormal", "Enzyme X (U/L)", "U/L", (0.5, 2.0)),
    FeatureInfo("gene:G1", "binary", "G1 (likely) pathogenic finding", "", None),
)
# Disease column first; Other is its mirror image, so each relative weight is the Disease one.
W = np.array([[1.0, -1.0], [2.0, -2.0], [1.0, -1.0], [3.0, -3.0]])
MEAN = np.array([0.5, 0.25, 0.0, 0.1])  # prevalences; the lab's log-mean is 0 (1 U/L)
STD = np.array([0.5, 0.43, 1.0, 0.3])


def tiny_engine(profile: TrainingProfile | None = None) -> DiagnosisEngine:
    model = Model(W.astype(np.float32), np.zeros(2, dtype=np.float32))
    saved = SavedModel(
        model=model, model_hash=model_hash(model), classes=("Disease", "Other"),
        feature_names=tuple(f.name for f in FEATURES),
        log_mask=np.array([False, False, True, False]),
        scale_mask=np.array([False, False, True, False]),
        mean=MEAN, std=STD, spec=None, provenance=[], round=1,
    )
    return DiagnosisEngine(saved, FEATURES, profile=profile)


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


# ------------------------------------------------------------------------------ formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [(5200.0, "5,200"), (12345.6, "12,346"), (150.0, "150"), (28.0, "28"), (2.5, "2.5"),
     (12.34, "12.3"), (0.35, "0.35"), (0.00123, "0.0012"), (0.0619, "0.062"), (0.0, "0"),
     (1e9, "1,000,000,000")],
)
def test_numbers_are_written_for_people(value: float, text: str) -> None:
    """Thousands separators, no exponent, two significant digits below one."""
    assert fmt_number(value) == text


def test_odds_words() -> None:
    """A share is an odds factor: ×2.4 up, ÷20 down, in a sentence naming the candidate."""
    assert fmt_odds(math.log(2.4)) == "×2.4"
    assert fmt_odds(-math.log(20)) == "÷20"
    assert effect_words("Fabry disease", math.log(2.4)) == (
        "makes Fabry disease more likely (odds ×2.4 vs the average class)"
    )
    assert "less likely (odds ÷20" in effect_words("Fabry disease", -math.log(20))
    assert fmt_pct(0.62) == "62%" and fmt_pct(0.041) == "4.1%" and fmt_pct(0.0035) == "0.35%"


# --------------------------------------------------------------------------- explanations


def test_shares_add_up_to_the_relative_logit() -> None:
    """baseline + Σ shares = logit − mean logit; hand-checked on a 2×2 model."""
    w = np.array([[1.0, -1.0], [0.5, 0.5]])
    b = np.array([0.2, -0.2])
    z, z_ref = np.array([1.0, 0.0]), np.array([0.5, 0.0])
    base, shares = candidate_shares(z, z_ref, w, b, 0)
    assert base == pytest.approx(0.7) and shares == pytest.approx([0.5, 0.0])
    logits = z @ w + b
    assert base + shares.sum() == pytest.approx(logits[0] - logits.mean())


def test_tiny_engine_for_and_against() -> None:
    """Sign A observed: for Disease; Sign B not mentioned and no genetic test: against it.

    z = (1, 0, 0, 0), reference z̄ = (0.5, 0.25, 0, 0.1), relative weights (1, 2, 1, 3):
    shares (0.5, −0.5, 0, −0.3), baseline 1.3, P(Disease) = σ(2).
    """
    d = tiny_engine().diagnose(PatientRequest(symptoms=("HP:0000001",)))
    top = d.differential[0]
    assert top.name == "Disease" and top.probability == pytest.approx(sigmoid(2.0))
    assert top.baseline == pytest.approx(1.3)
    assert [(f.feature, f.status) for f in top.evidence_for] == [("HP:0000001", "observed")]
    assert top.evidence_for[0].contribution == pytest.approx(0.5)
    assert top.evidence_for[0].odds == f"×{fmt_number(math.exp(0.5))}"
    against = [(f.feature, f.status) for f in top.evidence_against]
    assert against == [("HP:0000002", "not_mentioned"), ("gene:G1", "not_sequenced")]
    assert [f.contribution for f in top.evidence_against] == pytest.approx([-0.5, -0.3])
    assert top.evidence_against[0].display == "not mentioned"
    assert "makes Disease less likely" in top.evidence_against[0].effect
    # Groups add up: every status once, summing the shares.
    groups = {g.status: g.contribution for g in top.groups}
    assert groups == {"observed": pytest.approx(0.5), "not_mentioned": pytest.approx(-0.5),
                      "not_sequenced": pytest.approx(-0.3)}
    # Other is the mirror image: what argues against Disease argues for Other.
    other = d.differential[1]
    assert {f.feature for f in other.evidence_for} == {"HP:0000002", "gene:G1"}
    # The old field keeps its meaning: reported findings that support the candidate.
    assert [f.feature for f in top.findings] == ["HP:0000001"]
    doc = d.to_dict()["differential"][0]
    assert doc["evidence_against"][0]["display"] == "not mentioned"
    assert doc["baseline"]["contribution"] == pytest.approx(1.3)


def test_measured_lab_is_formatted_and_flagged() -> None:
    """A lab of 5,200 U/L: full label without unit suffix, value with separators, 'high'."""
    d = tiny_engine().diagnose(PatientRequest(biomarkers={"lab": Measurement(5200.0, "U/L")}))
    f = next(f for f in d.differential[0].evidence_for if f.feature == "lab")
    assert f.label == "Enzyme X" and f.display == "5,200 U/L (high)" and f.flag == "high"
    assert f.contribution == pytest.approx(math.log(5200.0), rel=1e-4)


# ---------------------------------------------------------------------------- OOD


def test_histogram_bins_and_counts() -> None:
    """Recorded symptoms per row, binned by FINDING_BINS (last bin open)."""
    x = np.array([[1, 0, np.nan], [1, 1, 0], [0, 0, 0]], dtype=float)
    counts = count_findings(x, np.array([True, True, False]))
    assert counts.tolist() == [1, 2, 0]
    h = finding_histogram(np.array([0, 1, 2, 7, 500]))
    assert h.shape == (len(FINDING_BINS),) and h.sum() == 5
    assert h[0] == h[1] == h[2] == 1 and h[FINDING_BINS.index(6)] == 1 and h[-1] == 1


def test_combine_refuses_partial_or_inconsistent_histograms() -> None:
    """All sites valid → the sum; one missing, mis-shaped, negative or off-count → None."""
    a = finding_histogram(np.array([10, 12, 14]))
    b = finding_histogram(np.array([20]))
    assert combine_finding_hists([(a, 3), (b, 1)]) == tuple(a + b)
    assert combine_finding_hists([(a, 3), (None, 1)]) is None
    assert combine_finding_hists([(a, 4)]) is None  # does not add up to the committed rows
    assert combine_finding_hists([(a[:-1], 3)]) is None
    assert combine_finding_hists([(a * 0.5, 1.5)]) is None  # type: ignore[list-item]
    assert combine_finding_hists([(-a, -3)]) is None


def test_setup_stats_carry_the_histogram_and_older_peers_decode() -> None:
    """The new array travels; a payload without it (an older site) decodes to None."""
    base: dict[str, Any] = dict(spec_hash="s", n_examples=3, count=np.ones(2), total=np.ones(2),
                total_sq=np.ones(2), class_counts=np.ones(2))
    h = finding_histogram(np.array([10, 12, 14]))
    got = SetupStats.from_payload(SetupStats(**base, finding_hist=h).to_payload())
    assert got.finding_hist is not None and got.finding_hist.tolist() == h.tolist()
    assert SetupStats.from_payload(SetupStats(**base).to_payload()).finding_hist is None


def _profile(counts: list[int]) -> TrainingProfile:
    return TrainingProfile(tuple(float(v) for v in finding_histogram(np.array(counts))))


def test_ood_few_and_many_findings() -> None:
    """1,000 training rows with 10–30 symptoms: 1 is too few, 120 too many, 12 is fine."""
    p = _profile(list(range(10, 31)) * 48)
    few = check_ood(n_findings=1, profile=p, extreme=[], n_unknown=0, n_terms=1)
    assert [r.kind for r in few.reasons] == ["few_findings"] and few.flag
    assert "none of the training patients had so few" in few.reasons[0].message
    many = check_ood(n_findings=120, profile=p, extreme=[], n_unknown=0, n_terms=120)
    assert [r.kind for r in many.reasons] == ["many_findings"]
    ok = check_ood(n_findings=12, profile=p, extreme=[], n_unknown=0, n_terms=12)
    assert not ok.flag and ok.checked[0] == "findings"
    # Without the aggregate the count is not judged, and the answer says so.
    blind = check_ood(n_findings=1, profile=TrainingProfile(), extreme=[], n_unknown=0,
                      n_terms=1)
    assert not blind.flag and "findings" not in blind.checked


def test_ood_extreme_lab_and_unknown_terms() -> None:
    """A lab 5 SD above the mean on the model's scale, and 3 of 4 terms unknown."""
    engine = tiny_engine(_profile([1, 1, 2, 2, 3] * 100))
    d = engine.diagnose(PatientRequest(symptoms=("HP:0000001", "HP:9", "HP:8", "HP:7"),
                                       biomarkers={"lab": Measurement(math.exp(5.0), "U/L")}))
    kinds = {r.kind: r for r in d.out_of_distribution.reasons}
    assert set(kinds) == {"extreme_value", "unknown_terms"}
    assert kinds["extreme_value"].feature == "lab"
    assert "Enzyme X = 148 U/L is 5.0 standard deviations above" in kinds["extreme_value"].message
    assert kinds["unknown_terms"].message.startswith("3 of 4 entered terms")
    fine = engine.diagnose(PatientRequest(symptoms=("HP:0000001",),
                                          biomarkers={"lab": Measurement(math.exp(3.9), "U/L")}))
    assert not fine.out_of_distribution.flag
    assert fine.to_dict()["out_of_distribution"] == {
        "flag": False, "reasons": [],
        "checked": ["findings", "extreme_value", "rare_input", "unknown_terms"],
    }


# ---------------------------------------------------------------------------- next tests


def test_gap_swing_by_hand() -> None:
    p0, p1 = np.array([0.7, 0.2, 0.1]), np.array([0.3, 0.6, 0.1])
    assert gap_swing(p0, p1, 0, 1) == pytest.approx(-0.8)


def test_next_tests_ranked_by_swing() -> None:
    """Sign A observed, P(Disease) = σ(2). Hand-computed swings of the Disease−Other gap:

    lab low (z = −2): logit gap 2 → −2, swing |(2σ(−2)−1) − (2σ(2)−1)| = 1.523 (Other wins);
    G1 found: gap 2 → 8, swing 0.2377; Sign B present: gap 2 → 6, swing 0.2334.
    """
    d = tiny_engine().diagnose(PatientRequest(symptoms=("HP:0000001",)))
    gap = 2 * sigmoid(2.0) - 1
    tests = {t.feature: t for t in d.next_tests}
    assert [t.feature for t in d.next_tests] == ["lab", "genes", "HP:0000002"]
    assert tests["lab"].swing == pytest.approx(gap - (2 * sigmoid(-2.0) - 1), rel=1e-4)
    assert tests["genes"].swing == pytest.approx((2 * sigmoid(8.0) - 1) - gap, rel=1e-4)
    assert tests["HP:0000002"].swing == pytest.approx((2 * sigmoid(6.0) - 1) - gap, rel=1e-4)
    low = tests["lab"].outcomes[0]
    assert low.top == "Other" and low.value == pytest.approx(math.exp(-2.0))
    assert "if low (≈ 0.14 U/L, training mean − 2 SD): Other becomes most likely" in \
        tests["lab"].reason
    assert tests["HP:0000002"].question == "Ask about or look for: Sign B"
    assert "if a pathogenic G1 variant is found: Disease stays most likely" in \
        tests["genes"].reason
    # Already measured or sequenced: not suggested again.
    done = tiny_engine().diagnose(PatientRequest(
        symptoms=("HP:0000001",), biomarkers={"lab": Measurement(math.exp(-5.0), "U/L")},
        genes=("G1",)))  # Disease logit 1 − 5 + 3 = −1; Sign B (+2) would turn it
    assert [t.feature for t in done.next_tests] == ["HP:0000002"]


def test_next_tests_skip_what_cannot_move_the_gap() -> None:
    """Everything known: nothing left to suggest (no noise entries)."""
    d = tiny_engine().diagnose(PatientRequest(
        symptoms=("HP:0000001", "HP:0000002"), biomarkers={"lab": Measurement(1.0, "U/L")},
        genes=("G1",)))
    assert d.next_tests == ()
    assert explain.MIN_SWING > 0


# ------------------------------------------- the issue-14 encoding: excluded / measured / tested

FEATURES2 = (
    FeatureInfo("HP:0000001", "binary", "Sign A", "", None),
    FeatureInfo("excluded:HP:0000001", "binary", "Sign A (excluded)", "", None),
    FeatureInfo("lab", "lognormal", "Enzyme X (U/L)", "U/L", (0.5, 2.0)),
    FeatureInfo("measured:lab", "binary", "Enzyme X measured", "", None),
    FeatureInfo("gene:G1", "binary", "G1 (likely) pathogenic finding", "", None),
    FeatureInfo("genetic_testing_done", "binary", "Genetic testing done", "", None),
)
W2 = np.array([[1.0], [-2.0], [1.0], [0.5], [3.0], [-1.0]]) * np.array([[1.0, -1.0]])
MEAN2 = np.array([0.5, 0.2, 0.0, 0.6, 0.1, 0.7])


def test_excluded_symptom_and_indicators_join_their_rows() -> None:
    """Sign A excluded, lab not measured, tested with nothing found.

    z = (0, 1, 0, 0, 0, 1), z̄ = (0.5, 0.2, 0, 0.6, 0.1, 0.7), Disease weights (1, −2, 1, 0.5,
    3, −1): column shares (−0.5, −1.6, 0, −0.3, −0.3, −0.3). Rows: Sign A −2.1 (its two
    columns), the lab −0.3 (value + measured), G1 −0.3, testing −0.3; baseline 0; logit −3.
    """
    model = Model(W2.astype(np.float32), np.zeros(2, dtype=np.float32))
    saved = SavedModel(
        model=model, model_hash=model_hash(model), classes=("Disease", "Other"),
        feature_names=tuple(f.name for f in FEATURES2),
        log_mask=np.array([f.kind == "lognormal" for f in FEATURES2]),
        scale_mask=np.array([f.kind != "binary" for f in FEATURES2]),
        mean=MEAN2, std=np.ones(6), spec=None, provenance=[], round=1,
    )
    engine = DiagnosisEngine(saved, FEATURES2)
    d = engine.diagnose(PatientRequest(excluded_symptoms=("HP:0000001",), sequenced=True))
    other, disease = d.differential
    assert other.name == "Other" and disease.probability == pytest.approx(sigmoid(-6.0))
    assert disease.baseline == pytest.approx(0.0, abs=1e-6)
    rows = [(f.feature, f.status, f.display) for f in disease.evidence_against]
    assert rows[0] == ("HP:0000001", "excluded", "absent (excluded)")
    assert set(rows[1:]) == {  # three equal shares: their order is not specified
        ("lab", "not_measured", "not measured"),
        ("gene:G1", "no_variant", "tested, no variant"),
        ("genetic_testing_done", "sequenced", "genetic testing done"),
    }
    assert [f.contribution for f in disease.evidence_against] == pytest.approx(
        [-2.1, -0.3, -0.3, -0.3], abs=1e-6)
    assert disease.evidence_against[0].label == "Sign A"
    # Excluded and already tested are not asked again; the unmeasured lab is.
    assert [t.feature for t in d.next_tests] == ["lab"]
    # Not said: no genetic test, so the panel is suggested, and "nothing found" differs now.
    d2 = engine.diagnose(PatientRequest(excluded_symptoms=("HP:0000001",)))
    genetic = next(t for t in d2.next_tests if t.kind == "genetic_test")
    nothing = genetic.outcomes[-1]
    assert nothing.answer == "if nothing is found" and abs(nothing.gap_change) > 0


def test_ood_names_inputs_no_training_patient_had() -> None:
    """Training always measured the lab (mean 1) and never excluded Sign A (mean 0)."""
    model = Model(W2.astype(np.float32), np.zeros(2, dtype=np.float32))
    mean = np.array([0.5, 0.0, 0.0, 1.0, 0.1, 0.7])
    saved = SavedModel(
        model=model, model_hash=model_hash(model), classes=("Disease", "Other"),
        feature_names=tuple(f.name for f in FEATURES2),
        log_mask=np.array([f.kind == "lognormal" for f in FEATURES2]),
        scale_mask=np.array([f.kind != "binary" for f in FEATURES2]),
        mean=mean, std=np.ones(6), spec=None, provenance=[], round=1,
    )
    engine = DiagnosisEngine(saved, FEATURES2)
    d = engine.diagnose(PatientRequest(excluded_symptoms=("HP:0000001",)))
    (reason,) = d.out_of_distribution.reasons
    assert reason.kind == "rare_input" and reason.feature == "measured:lab"
    assert "Enzyme X not measured (no training patient)" in reason.message
    # An exclusion no training row had is not flagged: its weight is ~0, no evidence.
    assert "Sign A" not in reason.message
    ok = engine.diagnose(PatientRequest(symptoms=("HP:0000001",),
                                        biomarkers={"lab": Measurement(1.0, "U/L")}))
    assert not ok.out_of_distribution.flag
