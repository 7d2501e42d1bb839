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
        assert {f.feature for f in c.findings} <= {"ck", "measured:ck"}


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
        ({"excluded_symptoms": "HP:1"}, "excluded_symptoms"),
        ({"excluded_symptoms": ["HP:1", None]}, "excluded_symptoms.1"),
        ({"sequenced": "yes"}, "sequenced"),
        ({"sequenced": 1}, "sequenced"),
        ({"sequenced": False, "genes": ["GLA"]}, "sequenced"),
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


# ------------------------------------------------- issue 14: observed / excluded / unknown


def _column(engine: DiagnosisEngine, x: np.ndarray, name: str) -> float:
    return float(x[[f.name for f in engine.features].index(name)])


def test_from_dict_reads_excluded_symptoms_and_sequenced() -> None:
    """The contract's two fields parse; ``sequenced`` None means "iff genes were reported"."""
    req = PatientRequest.from_dict(
        {"symptoms": ["HP:0001744"], "excluded_symptoms": ["HP:0001250"], "sequenced": True}
    )
    assert req.excluded_symptoms == ("HP:0001250",) and req.sequenced is True
    assert req.genetic_testing_done
    assert PatientRequest.from_dict({"genes": ["GLA"]}).genetic_testing_done
    assert not PatientRequest.from_dict({}).genetic_testing_done
    assert not PatientRequest.from_dict({"sequenced": None}).genetic_testing_done


def test_excluded_unknown_and_observed_are_three_different_rows(engine: DiagnosisEngine) -> None:
    """Observed sets the term, excluded sets ``excluded:term``, not mentioned sets neither."""
    t = "HP:0001744"
    seen, _, _ = engine.encode(PatientRequest(symptoms=(t,)))
    absent, _, _ = engine.encode(PatientRequest(excluded_symptoms=(t,)))
    unknown, _, _ = engine.encode(PatientRequest())
    assert (_column(engine, seen, t), _column(engine, seen, f"excluded:{t}")) == (1.0, 0.0)
    assert (_column(engine, absent, t), _column(engine, absent, f"excluded:{t}")) == (0.0, 1.0)
    assert (_column(engine, unknown, t), _column(engine, unknown, f"excluded:{t}")) == (0, 0)


def test_unmeasured_marker_is_not_normal_and_unsequenced_is_not_negative(
    engine: DiagnosisEngine,
) -> None:
    """A missing marker is NaN with measured 0; no genes + sequenced differs from not said."""
    x, _, _ = engine.encode(PatientRequest(biomarkers={"ck": Measurement(900.0, "U/L")}))
    assert _column(engine, x, "measured:ck") == 1.0 and _column(engine, x, "ck") == 900.0
    assert _column(engine, x, "measured:lyso_gb3") == 0.0
    assert math.isnan(_column(engine, x, "lyso_gb3"))
    assert _column(engine, x, "genetic_testing_done") == 0.0
    tested, _, _ = engine.encode(PatientRequest(sequenced=True))
    assert _column(engine, tested, "genetic_testing_done") == 1.0
    found, _, _ = engine.encode(PatientRequest(genes=("GLA",)))
    assert _column(engine, found, "genetic_testing_done") == 1.0
    assert _column(engine, found, "gene:GLA") == 1.0
    with pytest.raises(ValidationError) as info:
        engine.encode(PatientRequest(genes=("GLA",), sequenced=False))
    assert info.value.field == "sequenced"


def test_excluding_a_parent_excludes_panel_descendants(engine: DiagnosisEngine) -> None:
    """With the ontology, an excluded term rules out every panel term below it (true path);
    an observed descendant keeps its own positive evidence."""
    from medimesh.hpo import HpoAncestors

    onto = HpoAncestors.load()
    full = DiagnosisEngine(engine.saved, engine.features, onto)
    panel = [f.name for f in engine.features if f.name.startswith("HP:")]
    parent, child = next(
        (p, c) for c in panel for p in sorted(onto.parents(c)) if p in panel
    )
    x, unknown, mapped = full.encode(PatientRequest(excluded_symptoms=(parent,)))
    assert unknown == []
    assert _column(full, x, f"excluded:{parent}") == 1.0
    assert _column(full, x, f"excluded:{child}") == 1.0
    assert mapped == {}  # a panel term: its implied descendants go unsaid
    up, _, _ = full.encode(PatientRequest(symptoms=(child,)))
    assert _column(full, up, parent) == 1.0  # true path: the ancestor is observed too
    assert _column(full, up, child) == 1.0
    plain, _, _ = engine.encode(PatientRequest(symptoms=(child,)))
    assert _column(engine, plain, parent) == 0.0  # without the ontology: the term only
    both, _, _ = full.encode(PatientRequest(symptoms=(child,), excluded_symptoms=(parent,)))
    assert _column(full, both, child) == 1.0 and _column(full, both, f"excluded:{child}") == 0.0
    same, _, _ = full.encode(PatientRequest(symptoms=(child,), excluded_symptoms=(child,)))
    assert _column(full, same, child) == 1.0 and _column(full, same, f"excluded:{child}") == 0
    # Without the ontology only the exact term is excluded.
    y, _, _ = engine.encode(PatientRequest(excluded_symptoms=(parent,)))
    assert _column(engine, y, f"excluded:{child}") == 0.0
    _, unknown, _ = engine.encode(PatientRequest(excluded_symptoms=("HP:9999999",)))
    assert unknown == ["HP:9999999"]


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


@pytest.mark.parametrize("with_ontology", [False, True])
def test_next_test_answers_equal_the_re_encoded_request(
    engine: DiagnosisEngine, with_ontology: bool
) -> None:
    """Every probed answer (edited from the encoded row for speed) has exactly the
    probabilities of the request with that answer added, re-encoded from scratch."""
    import dataclasses

    if with_ontology:
        from medimesh.hpo import HpoAncestors

        engine = DiagnosisEngine(engine.saved, engine.features, HpoAncestors.load())
    # HP:0001250 (seizure) excluded: with the ontology its panel descendants are too.
    req = PatientRequest(symptoms=("HP:0001744",), excluded_symptoms=("HP:0001250",),
                         biomarkers={"ck": Measurement(300.0, "U/L")}, age=6.0)
    x, _, _ = engine.encode(req)
    probes = engine._probes(req, x)
    assert {p.kind for p in probes} == {"symptom", "biomarker", "genetic_test"}
    units = {f.name: f.unit for f in engine.features}
    genes = sorted(f.name[5:] for f in engine.features if f.name.startswith("gene:"))
    for probe in probes:
        if probe.kind == "symptom":
            variants = [
                dataclasses.replace(req, symptoms=(*req.symptoms, probe.feature)),
                dataclasses.replace(req, excluded_symptoms=(*req.excluded_symptoms,
                                                            probe.feature)),
            ]
        elif probe.kind == "biomarker":
            variants = [
                dataclasses.replace(req, biomarkers={
                    **req.biomarkers, probe.feature: Measurement(float(v or 0),
                                                                 units[probe.feature])})
                for v in probe.values
            ]
        else:
            variants = [dataclasses.replace(req, genes=(g,), sequenced=True) for g in genes]
            variants.append(dataclasses.replace(req, sequenced=True))
        rows = np.vstack([engine.encode(v)[0] for v in variants])
        expect = engine.saved.predict_proba(rows)
        assert probe.proba == pytest.approx(expect, abs=1e-12), probe.feature


def test_unknown_sex_is_not_read_as_female(engine: DiagnosisEngine) -> None:
    """A 0/1 column left empty would mean "female"; unknown sex takes the training share."""
    base = {"symptoms": ["HP:0001744", "HP:0002240"]}
    unknown, _, _ = engine.encode(PatientRequest.from_dict(base))
    female, _, _ = engine.encode(PatientRequest.from_dict({**base, "sex": "F"}))
    male, _, _ = engine.encode(PatientRequest.from_dict({**base, "sex": "M"}))
    share = _column(engine, unknown, "sex_male")
    assert _column(engine, female, "sex_male") == 0.0 and _column(engine, male, "sex_male") == 1.0
    assert 0.0 < share < 1.0
    j = engine.saved.feature_names.index("sex_male")
    assert share == pytest.approx(float(engine.saved.mean[j]))
