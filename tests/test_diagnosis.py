"""The pure diagnosis engine: request validation, ranking, explanations (no Ray, no HTTP)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from medimesh.bench.oracle import request_from_row, train_quick_model
from medimesh.data import cohort
from medimesh.diagnosis import (
    DISCLAIMER,
    DiagnosisEngine,
    Measurement,
    PatientRequest,
    ValidationError,
    saved_model_for,
)


@pytest.fixture(scope="module")
def engine() -> DiagnosisEngine:
    model, mean, std = train_quick_model(steps=150)
    saved = saved_model_for(
        model, cohort.features(), cohort.class_names(), mean, std, round_=3
    )
    return DiagnosisEngine(saved, cohort.features())


def _gaucher() -> PatientRequest:
    return PatientRequest(
        symptoms=("HP:0001744", "HP:0001433"),
        biomarkers={
            "chitotriosidase": Measurement(9000.0, "nmol/h/mL"),
            "lyso_gb1": Measurement(150.0, "ng/mL"),
        },
        genes=("GBA1",),
        age=12.0,
        sex="F",
    )


def test_differential_ranks_every_class_and_sums_to_one(engine: DiagnosisEngine) -> None:
    """All classes appear once, sorted by probability, summing to one."""
    d = engine.diagnose(_gaucher())
    probs = [c.probability for c in d.differential]
    assert sorted(c.name for c in d.differential) == sorted(cohort.class_names())
    assert probs == sorted(probs, reverse=True)
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-9)
    assert [c.rank for c in d.differential] == list(range(1, len(probs) + 1))


def test_classic_gaucher_is_top_with_supporting_findings(engine: DiagnosisEngine) -> None:
    """A textbook Gaucher profile ranks Gaucher first, explained by its biomarkers/gene."""
    d = engine.diagnose(_gaucher())
    top = d.differential[0]
    assert "Gaucher" in top.name
    assert top.findings and all(f.contribution > 0 for f in top.findings)
    features = {f.feature for f in top.findings}
    assert features & {"chitotriosidase", "lyso_gb1", "gene:GBA1"}
    chito = next((f for f in top.findings if f.feature == "chitotriosidase"), None)
    if chito is not None:
        assert chito.flag == "high" and chito.unit == "nmol/h/mL"


def test_only_top_three_are_explained(engine: DiagnosisEngine) -> None:
    """Findings are computed for the top three candidates only."""
    d = engine.diagnose(_gaucher())
    assert all(c.findings == () for c in d.differential[3:])


def test_answer_names_model_and_disclaimer(engine: DiagnosisEngine) -> None:
    """Every answer names the model hash and round and carries the disclaimer."""
    d = engine.diagnose(PatientRequest())
    assert d.model_hash == engine.model_hash and d.model_round == 3
    assert d.disclaimer == DISCLAIMER and "clinical judgement" in DISCLAIMER
    doc = d.to_dict()
    assert doc["model_hash"] == engine.model_hash and len(doc["differential"]) == 11


def test_unknown_terms_are_reported_not_fatal(engine: DiagnosisEngine) -> None:
    """Unknown HPO ids and genes come back in unknown_terms."""
    d = engine.diagnose(PatientRequest(symptoms=("HP:9999999", "HP:0001744"), genes=("FOO1",)))
    assert d.unknown_terms == ("HP:9999999", "FOO1")


def test_missing_biomarkers_are_imputed(engine: DiagnosisEngine) -> None:
    """Unmeasured biomarkers are listed as imputed and do not contribute."""
    d = engine.diagnose(PatientRequest(biomarkers={"ck": Measurement(900.0, "U/L")}))
    assert "ck" not in d.imputed and "lyso_gb3" in d.imputed
    for c in d.differential[:3]:
        assert {f.feature for f in c.findings} <= {"ck"}


def test_unit_conversion_matches_native_unit(engine: DiagnosisEngine) -> None:
    """0.1 g/L ceruloplasmin is 10 mg/dL: same probabilities."""
    a = engine.diagnose(PatientRequest(biomarkers={"ceruloplasmin": Measurement(10.0, "mg/dL")}))
    b = engine.diagnose(PatientRequest(biomarkers={"ceruloplasmin": Measurement(0.1, "g/L")}))
    pa = {c.name: c.probability for c in a.differential}
    pb = {c.name: c.probability for c in b.differential}
    assert pa == pytest.approx(pb)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (PatientRequest(biomarkers={"ck": Measurement(100.0, "mg/dL")}), "biomarkers.ck.unit"),
        (PatientRequest(biomarkers={"nope": Measurement(1.0, "U/L")}), "biomarkers.nope"),
        (PatientRequest(biomarkers={"ck": Measurement(-1.0, "U/L")}), "biomarkers.ck.value"),
        (PatientRequest(biomarkers={"ck": Measurement(math.nan, "U/L")}), "biomarkers.ck.value"),
        (PatientRequest(age=200.0), "age"),
        (PatientRequest(genes=("",)), "genes.0"),
    ],
)
def test_invalid_fields_raise_with_path(
    engine: DiagnosisEngine, request_: PatientRequest, field: str
) -> None:
    """Wrong unit, unknown biomarker, negative/NaN value, absurd age: error names the field."""
    with pytest.raises(ValidationError) as info:
        engine.diagnose(request_)
    assert info.value.field == field


def test_from_dict_validates_types() -> None:
    """JSON-shaped input is parsed; type errors name the field."""
    req = PatientRequest.from_dict(
        {"symptoms": ["HP:0001744"], "biomarkers": {"ck": {"value": 5, "unit": "U/L"}},
         "sex": "M", "age": 3}
    )
    assert req.biomarkers["ck"] == Measurement(5.0, "U/L") and req.age == 3.0
    cases: list[tuple[dict[str, Any], str]] = [
        ({"symptoms": "HP:1"}, "symptoms"),
        ({"symptoms": [1]}, "symptoms.0"),
        ({"biomarkers": {"ck": {"value": "x", "unit": "U/L"}}}, "biomarkers.ck.value"),
        ({"sex": "X"}, "sex"),
        ({"weight": 3}, "weight"),
    ]
    for doc, field in cases:
        with pytest.raises(ValidationError) as info:
            PatientRequest.from_dict(doc)
        assert info.value.field == field


def test_engine_matches_saved_model_on_cohort_rows(engine: DiagnosisEngine) -> None:
    """Encoding a request built from a raw row reproduces the model's own probabilities."""
    site = cohort.make_site(cohort.CohortConfig(seed=5), 1)
    feats = cohort.features()
    for row in site.x_test[:20]:
        body = request_from_row(row, feats)
        d = engine.diagnose(PatientRequest.from_dict(body))
        expect = engine.saved.predict_proba(row[None, :])[0]
        got = {c.name: c.probability for c in d.differential}
        for name, p in zip(engine.saved.classes, expect, strict=True):
            assert got[name] == pytest.approx(float(p), abs=1e-6)


def test_contributions_are_exact_for_the_linear_model(engine: DiagnosisEngine) -> None:
    """Summed relative contributions equal the logit gap to the class-mean logit (minus bias)."""
    x, _, _ = engine.encode(_gaucher())
    z = engine.saved.prepare(x[None, :])[0]
    w = np.asarray(engine.saved.model.weights, dtype=float)
    logits = z @ w
    rel = z @ (w - w.mean(axis=1, keepdims=True))
    assert rel == pytest.approx(logits - logits.mean())


def test_mismatched_model_is_refused() -> None:
    """A model with the wrong number of features cannot build an engine."""
    from medimesh.model import init_model

    feats = cohort.features()
    with pytest.raises(ValidationError):
        saved_model_for(
            init_model(3, 11), feats, cohort.class_names(), np.zeros(3), np.ones(3)
        )


def test_evidence_groups_add_up_to_the_log_odds(engine: DiagnosisEngine) -> None:
    """baseline + Σ group shares = each explained candidate's logit minus the mean logit."""
    req = PatientRequest(symptoms=("HP:0001014", "HP:0000966", "HP:0000093"))
    d = engine.diagnose(req)
    x, _, _ = engine.encode(req)
    z = engine.saved.prepare(x[None, :])[0]
    w = np.asarray(engine.saved.model.weights, dtype=float)
    logits = z @ w + np.asarray(engine.saved.model.bias, dtype=float)
    for c in d.differential[:3]:
        k = engine.saved.classes.index(c.name)
        assert c.baseline is not None
        total = c.baseline + sum(g.contribution for g in c.groups)
        # groups below 0.01 are left out, rounding to 4 places: a loose but real bound
        assert total == pytest.approx(logits[k] - logits.mean(), abs=0.05)
        assert c.evidence_against and all(f.contribution < 0 for f in c.evidence_against)
        assert all(f.contribution > 0 for f in c.evidence_for)
    statuses = {g.status for g in d.differential[0].groups}
    assert "not_mentioned" in statuses  # the silence is shown, not hidden in the bias
