"""GA4GH phenopackets → MediMesh patients: mapping, counting and encoding (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import phenopackets as pps
import pytest
from google.protobuf.json_format import MessageToDict, MessageToJson
from pydantic import BaseModel

from medimesh.bench.oracle import train_quick_model
from medimesh.data import cohort
from medimesh.diagnosis import DiagnosisEngine, saved_model_for
from medimesh.hpo import HpoAncestors
from medimesh.model import model_hash
from medimesh.phenopackets import (
    PhenopacketError,
    convert,
    encode_directory,
    iso8601_years,
    load_label_codes,
    panel_label_codes,
    parse_phenopacket,
    request_encoder,
)

FABRY_ORPHA = "ORPHA:324"
ANGIOKERATOMA = "HP:0001014"  # Angiokeratoma (annotated for Fabry in the panel)
PROTEINURIA = "HP:0000093"


def _feature(term: str, excluded: bool = False, onset: str | None = None) -> Any:
    f = pps.PhenotypicFeature(type=pps.OntologyClass(id=term, label=term), excluded=excluded)
    if onset is not None:
        f.onset.CopyFrom(pps.TimeElement(age=pps.Age(iso8601duration=onset)))
    return f


def _packet(
    features: list[Any] = (),  # type: ignore[assignment]
    disease: str | None = FABRY_ORPHA,
    sex: Any = pps.Sex.MALE,
    disease_onset: str | None = None,
    interpretations: list[Any] = (),  # type: ignore[assignment]
    measurements: list[Any] = (),  # type: ignore[assignment]
) -> Any:
    pp = pps.Phenopacket(id="pp-1", subject=pps.Individual(id="p1", sex=sex))
    pp.phenotypic_features.extend(features)
    if disease is not None:
        d = pps.Disease(term=pps.OntologyClass(id=disease, label="d"))
        if disease_onset is not None:
            d.onset.CopyFrom(pps.TimeElement(age=pps.Age(iso8601duration=disease_onset)))
        pp.diseases.append(d)
    pp.interpretations.extend(interpretations)
    pp.measurements.extend(measurements)
    pp.meta_data.CopyFrom(pps.MetaData(created_by="test", phenopacket_schema_version="2.0"))
    return pp


def _variant(symbol: str, acmg: Any, status: Any = None) -> Any:
    gi = pps.GenomicInterpretation(
        subject_or_biosample_id="p1",
        interpretation_status=status or pps.GenomicInterpretation.CAUSATIVE,
        variant_interpretation=pps.VariantInterpretation(
            acmg_pathogenicity_classification=acmg,
            variation_descriptor=pps.VariationDescriptor(
                id="v1", gene_context=pps.GeneDescriptor(value_id="HGNC:1", symbol=symbol)
            ),
        ),
    )
    if status is not None:
        gi.interpretation_status = status
    return gi


def _interpretation(*gis: Any, status: Any = None) -> Any:
    return pps.Interpretation(
        id="i1",
        progress_status=status or pps.Interpretation.SOLVED,
        diagnosis=pps.Diagnosis(disease=pps.OntologyClass(id=FABRY_ORPHA, label="Fabry"),
                                genomic_interpretations=list(gis)),
    )


def _roundtrip(pp: Any) -> Any:
    """Through JSON, as a file or an HTTP body carries it."""
    return parse_phenopacket(MessageToJson(pp))


# ------------------------------------------------------------------------------- mapping


def test_observed_and_excluded_features_map_to_symptoms_and_excluded_symptoms() -> None:
    """excluded: true is an explicitly absent finding, not an observed one."""
    pp = _packet([_feature(ANGIOKERATOMA), _feature(PROTEINURIA, excluded=True)])
    conv = convert(_roundtrip(pp), panel_label_codes())
    assert conv.request.symptoms == (ANGIOKERATOMA,)
    assert conv.request.excluded_symptoms == (PROTEINURIA,)
    assert conv.label == "Fabry disease" and conv.problem is None
    assert conv.request.sex == "M"


def test_sex_other_than_male_or_female_is_unknown() -> None:
    """FEMALE → F; OTHER_SEX and UNKNOWN_SEX → not said."""
    assert convert(_packet(sex=pps.Sex.FEMALE)).request.sex == "F"
    assert convert(_packet(sex=pps.Sex.OTHER_SEX)).request.sex is None
    assert convert(_packet(sex=pps.Sex.UNKNOWN_SEX)).request.sex is None


def test_onset_prefers_the_disease_then_the_earliest_feature_and_may_be_missing() -> None:
    """Disease onset first; else the earliest observed feature's; none → unknown (None)."""
    feats = [_feature(ANGIOKERATOMA, onset="P12Y"), _feature(PROTEINURIA, onset="P6Y6M")]
    assert convert(_packet(feats, disease_onset="P9Y")).request.age == pytest.approx(9.0)
    from_feature = convert(_packet(feats))
    assert from_feature.request.age == pytest.approx(6.5)
    assert from_feature.onset_source == "feature"
    missing = convert(_packet([_feature(ANGIOKERATOMA)]))
    assert missing.request.age is None and missing.onset_source == ""
    hpo = _packet([_feature(ANGIOKERATOMA)])
    hpo.phenotypic_features[0].onset.CopyFrom(
        pps.TimeElement(ontology_class=pps.OntologyClass(id="HP:0003621", label="Juvenile"))
    )
    assert convert(hpo).request.age == pytest.approx(10.0)


def test_iso8601_durations() -> None:
    """Years, months, weeks and days; anything else is unreadable (None)."""
    assert iso8601_years("P3Y6M") == pytest.approx(3.5)
    assert iso8601_years("P2W") == pytest.approx(14 / 365.25)
    assert iso8601_years("P1Y2M3DT4H") == pytest.approx(1 + 2 / 12 + 3 / 365.25)
    assert iso8601_years("P") is None and iso8601_years("12 years") is None


def test_genes_come_from_pathogenic_interpretations_and_say_sequenced() -> None:
    """P/LP variants count, benign or rejected ones do not; any call means tested."""
    interp = _interpretation(
        _variant("GLA", pps.PATHOGENIC),
        _variant("GAA", pps.LIKELY_BENIGN, pps.GenomicInterpretation.CANDIDATE),
        _variant("IDUA", pps.LIKELY_PATHOGENIC, pps.GenomicInterpretation.REJECTED),
    )
    conv = convert(_roundtrip(_packet(interpretations=[interp])))
    assert conv.request.genes == ("GLA",) and conv.request.sequenced is True
    negative = convert(_packet(interpretations=[
        _interpretation(_variant("GLA", pps.BENIGN, pps.GenomicInterpretation.CANDIDATE))
    ]))
    assert negative.request.genes == () and negative.request.sequenced is True
    unsolved = convert(_packet(interpretations=[
        _interpretation(status=pps.Interpretation.UNSOLVED)
    ]))
    assert unsolved.request.sequenced is True
    assert convert(_packet()).request.sequenced is None


def test_labels_from_orpha_builtin_and_omim_mondo_through_a_mapping() -> None:
    """The panel knows its ORPHA ids only; OMIM/MONDO need label_codes; unknown is counted."""
    panel = panel_label_codes()
    assert len(panel.codes) == 10 and all(c.startswith("ORPHA:") for c in panel.codes)
    assert convert(_packet(disease="Orphanet:324"), panel).label == "Fabry disease"
    omim = convert(_packet(disease="OMIM:301500"), panel)
    assert omim.label is None and omim.problem == "unmappable disease"
    codes = load_label_codes({"label_codes": {"OMIM:301500": "Fabry disease",
                                              "MONDO:0010526": "Fabry disease"}})
    assert convert(_packet(disease="OMIM:301500"), codes).label == "Fabry disease"
    assert convert(_packet(disease=None), codes).problem == "no diagnosis"
    both = _packet(disease="ORPHA:905")  # Wilson, and a Fabry interpretation below
    both.interpretations.append(_interpretation())
    assert convert(both, codes).problem == "ambiguous diagnosis"
    other = load_label_codes({"unmapped_disease": "Other / none of these"})
    assert convert(_packet(disease="MONDO:0000001"), other).label == "Other / none of these"


def test_a_mapping_naming_an_unknown_class_is_refused() -> None:
    """A typo in a class name must not silently drop every patient of that disease."""
    with pytest.raises(PhenopacketError, match="not a class"):
        load_label_codes({"label_codes": {"OMIM:301500": "Fabry"}})
    with pytest.raises(PhenopacketError, match="unknown key"):
        load_label_codes({"labels": {}})


def test_schema_invalid_json_is_a_phenopacket_error() -> None:
    """Unknown fields and wrong enum values are refused by the schema, not guessed at."""
    with pytest.raises(PhenopacketError, match="not a valid phenopacket"):
        parse_phenopacket({"id": "x", "phenotypicFeaturez": []})
    with pytest.raises(PhenopacketError):
        parse_phenopacket({"subject": {"sex": "BOTH"}})
    with pytest.raises(PhenopacketError):
        parse_phenopacket("{not json")


def test_mapped_measurements_become_biomarkers_the_rest_are_counted() -> None:
    """Only assays named in assay_codes are read; units are the oracle's to check."""
    m = pps.Measurement(
        assay=pps.OntologyClass(id="LOINC:2157-6", label="CK"),
        value=pps.Value(quantity=pps.Quantity(
            unit=pps.OntologyClass(id="UCUM:U/L", label="U/L"), value=700.0)),
    )
    other = pps.Measurement(
        assay=pps.OntologyClass(id="LOINC:0000-0", label="?"),
        value=pps.Value(quantity=pps.Quantity(unit=pps.OntologyClass(id="UCUM:1"), value=1.0)),
    )
    codes = load_label_codes({"assay_codes": {"LOINC:2157-6": "ck"}})
    conv = convert(_roundtrip(_packet(measurements=[m, other])), codes)
    assert set(conv.request.biomarkers) == {"ck"}
    assert conv.request.biomarkers["ck"].value == 700.0
    assert conv.request.biomarkers["ck"].unit == "U/L"
    assert conv.unmapped_measurements == 1
    assert convert(_packet(measurements=[m])).unmapped_measurements == 1  # no mapping given


# ------------------------------------------------------------------------------ directories


@pytest.fixture(scope="module")
def ontology() -> HpoAncestors:
    return HpoAncestors.load()


def _write(directory: Path, name: str, pp: Any) -> None:
    (directory / name).write_text(MessageToJson(pp))


def test_a_directory_is_read_counted_and_never_crashes(tmp_path: Path) -> None:
    """Unknown terms, unmappable diseases and malformed files are counted, files named."""
    _write(tmp_path, "a.json", _packet([_feature(ANGIOKERATOMA), _feature("HP:9999999")]))
    _write(tmp_path, "b.json", _packet([_feature(PROTEINURIA, excluded=True)]))
    _write(tmp_path, "c.json", _packet([_feature(ANGIOKERATOMA)], disease="OMIM:301500"))
    _write(tmp_path, "d.json", _packet([_feature(ANGIOKERATOMA)], disease=None))
    (tmp_path / "broken.json").write_text('{"id": "x", "phenotypicFeatures": [')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "wrong.json").write_text(json.dumps({"id": 3, "notAField": True}))
    (tmp_path / "notes.txt").write_text("not a phenopacket")
    feats = cohort.features()
    enc = encode_directory(tmp_path, panel_label_codes(), request_encoder(), len(feats))
    r = enc.report.to_dict()
    assert r["files_read"] == 6 and r["used"] == 2
    assert r["skipped"] == {"malformed": 2, "no diagnosis": 1, "unmappable disease": 1}
    assert r["unknown_terms"] == 1 and r["files_with_unknown_terms"] == 1
    assert sorted(r["malformed_files"]) == ["broken.json", "sub/wrong.json"]
    assert r["onset_unknown"] == 2
    fabry = cohort.class_names().index("Fabry disease")
    assert enc.x.shape == (2, len(feats)) and enc.y.tolist() == [fabry, fabry]
    col = [f.name for f in feats].index(ANGIOKERATOMA)
    assert enc.x[0, col] == 1.0


def test_training_rows_are_encoded_exactly_as_the_served_engine_encodes_a_query(
    tmp_path: Path, ontology: HpoAncestors
) -> None:
    """The site's encoder and a trained engine's encode give the same row for one file."""
    pp = _packet(
        [_feature(ANGIOKERATOMA, onset="P8Y"), _feature(PROTEINURIA, excluded=True),
         _feature("HP:0001945")],  # fever: a real HPO term, mapped through ancestors or unknown
        interpretations=[_interpretation(_variant("GLA", pps.PATHOGENIC))],
    )
    _write(tmp_path, "p.json", pp)
    feats = cohort.features()
    enc = encode_directory(tmp_path, panel_label_codes(), request_encoder(ontology), len(feats))
    model, mean, std = train_quick_model(steps=20)
    engine = DiagnosisEngine(
        saved_model_for(model, feats, cohort.class_names(), mean, std), feats, ontology
    )
    row, _, _ = engine.encode(convert(parse_phenopacket(MessageToDict(pp))).request)
    np.testing.assert_array_equal(enc.x[0], row)


def test_the_http_subset_uses_the_protobuf_json_names() -> None:
    """Every field /diagnose/phenopacket reads is spelled as the Phenopacket JSON spells it."""
    from medimesh.actors import phenopacket_api as api

    pairs: list[tuple[type[BaseModel], Any]] = [
        (api.PhenopacketIn, pps.Phenopacket), (api.IndividualIn, pps.Individual),
        (api.PhenotypicFeatureIn, pps.PhenotypicFeature), (api.DiseaseIn, pps.Disease),
        (api.OntologyClassIn, pps.OntologyClass), (api.AgeIn, pps.Age),
        (api.AgeRangeIn, pps.AgeRange), (api.TimeElementIn, pps.TimeElement),
        (api.GeneDescriptorIn, pps.GeneDescriptor),
        (api.VariationDescriptorIn, pps.VariationDescriptor),
        (api.VariantInterpretationIn, pps.VariantInterpretation),
        (api.GenomicInterpretationIn, pps.GenomicInterpretation), (api.DiagnosisIn, pps.Diagnosis),
        (api.InterpretationIn, pps.Interpretation), (api.QuantityIn, pps.Quantity),
        (api.ValueIn, pps.Value), (api.MeasurementIn, pps.Measurement),
    ]
    for model, message in pairs:
        names = {f.json_name for f in message.DESCRIPTOR.fields}
        for name, info in model.model_fields.items():
            assert (info.alias or name) in names, (model.__name__, info.alias or name)
    pp = _packet([_feature(ANGIOKERATOMA, onset="P3Y")], disease_onset="P2Y",
                 interpretations=[_interpretation(_variant("GLA", pps.PATHOGENIC))])
    subset = api.PhenopacketIn.model_validate(MessageToDict(pp)).to_json()
    assert convert(parse_phenopacket(subset)) == convert(pp)


# --------------------------------------------------------------------- CSV-spec consortia

SPEC = {
    "label": "diagnosis",
    "classes": ["Fabry disease", "Wilson disease", "other"],
    "features": [
        {"name": "hpo", "type": "codes", "vocabulary": [ANGIOKERATOMA, PROTEINURIA, "HP:0001250"],
         "excluded_column": "hpo_absent"},
        {"name": "genes", "type": "codes", "vocabulary": ["GLA", "ATP7B"]},
        {"name": "onset", "type": "numeric", "unit": "years"},
        {"name": "sex", "type": "categorical", "levels": ["female", "male"]},
        {"name": "ck", "type": "numeric", "unit": "U/L", "transform": "log"},
    ],
}
SPEC_CODES = {
    "label_codes": {"OMIM:301500": "Fabry disease", "ORPHA:324": "Fabry disease"},
    "unmapped_disease": "other",
    "assay_codes": {"LOINC:2157-6": "ck"},
    "spec_columns": {"symptoms": "hpo", "genes": "genes", "age": "onset", "sex": "sex",
                     "sex_levels": {"M": "male", "F": "female"}},
}


def test_a_phenopacket_sets_the_same_spec_columns_as_the_equivalent_csv_row(
    tmp_path: Path,
) -> None:
    """CSV-spec consortia: a phenopacket and the CSV row saying the same encode alike."""
    from medimesh.phenopackets import spec_encoder, spec_label_codes
    from medimesh.spec import encode_csv, load_spec

    spec = load_spec(SPEC)
    codes = load_label_codes(SPEC_CODES, spec_label_codes(spec.classes))
    ck = pps.Measurement(
        assay=pps.OntologyClass(id="LOINC:2157-6"),
        value=pps.Value(quantity=pps.Quantity(unit=pps.OntologyClass(label="U/L"), value=700.0)),
    )
    pp = _packet([_feature(ANGIOKERATOMA), _feature(PROTEINURIA, excluded=True),
                  _feature("HP:9999999")],
                 disease="OMIM:301500", disease_onset="P9Y",
                 interpretations=[_interpretation(_variant("GLA", pps.PATHOGENIC))],
                 measurements=[ck])
    (tmp_path / "pp").mkdir()
    _write(tmp_path / "pp", "p.json", pp)
    _write(tmp_path / "pp", "q.json", _packet([_feature(ANGIOKERATOMA)], disease="MONDO:0000001",
                                              sex=pps.Sex.FEMALE))
    enc = encode_directory(tmp_path / "pp", codes, spec_encoder(spec, codes),
                           len(spec.column_names()))
    (tmp_path / "site.csv").write_text(
        "diagnosis,hpo,hpo_absent,genes,onset,sex,ck\n"
        f"Fabry disease,{ANGIOKERATOMA}|HP:9999999,{PROTEINURIA},GLA,9.0,male,700.0\n"
        f"other,{ANGIOKERATOMA},,,,female,\n"
    )
    csv = encode_csv(tmp_path / "site.csv", spec)
    np.testing.assert_array_equal(enc.x, csv.x)
    assert enc.y.tolist() == csv.y.tolist() == [0, 2]
    assert enc.report.unknown_terms == 1 and enc.report.used == 2


def test_a_spec_mapping_naming_a_wrong_feature_is_refused() -> None:
    """spec_columns must name features of the right type, assay codes numeric ones."""
    from medimesh.phenopackets import spec_encoder, spec_label_codes
    from medimesh.spec import load_spec

    spec = load_spec(SPEC)
    base = spec_label_codes(spec.classes)
    for bad in ({"spec_columns": {"symptoms": "onset"}}, {"spec_columns": {"age": "nope"}},
                {"spec_columns": {"weight": "onset"}}, {"assay_codes": {"X:1": "sex"}},
                {"spec_columns": {"sex": "sex", "sex_levels": {"M": "m"}}}):
        with pytest.raises(PhenopacketError):
            spec_encoder(spec, load_label_codes(bad, base))


# ------------------------------------------------------------------ the HTTP query format


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("phenotypicFeatures", 0, "type", "id"), "HP:\udfff"),  # lone surrogate
        (("phenotypicFeatures", 0, "excluded"), "yes"),
        (("phenotypicFeatures", 0, "type", "id"), 1),
        (("subject", "sex"), "BOTH"),
        (("measurements", 0, "value", "quantity", "value"), float("nan")),
        (("measurements", 0, "value", "quantity", "value"), True),
        (("phenotypicFeatures",), {"\udc00": float("nan")}),
    ],
)
def test_the_phenopacket_endpoint_refuses_hostile_values(
    live_oracle: str, path: tuple[str | int, ...], value: Any
) -> None:
    """A value of the wrong type where MediMesh reads: a clean 422, never a 5xx."""
    import httpx

    doc: Any = MessageToDict(_packet(
        [_feature(ANGIOKERATOMA)],
        measurements=[pps.Measurement(assay=pps.OntologyClass(id="LOINC:2157-6"), value=pps.Value(
            quantity=pps.Quantity(unit=pps.OntologyClass(label="U/L"), value=1.0)))],
    ))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    raw = json.dumps(doc, allow_nan=True).encode()
    r = httpx.post(f"{live_oracle}/diagnose/phenopacket", content=raw,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_the_phenopacket_endpoint_ignores_what_it_does_not_read(live_oracle: str) -> None:
    """Fields outside the read subset (metaData, biosamples, unknown keys) do not matter."""
    import httpx

    pp = _packet([_feature(ANGIOKERATOMA), _feature(PROTEINURIA, excluded=True)])
    plain = httpx.post(f"{live_oracle}/diagnose/phenopacket", json=MessageToDict(pp))
    extra = {**MessageToDict(pp), "biosamples": [{"id": "b1"}], "x-local": {"\udc00": 1},
             "metaData": "not even an object"}
    noisy = httpx.post(f"{live_oracle}/diagnose/phenopacket",
                       content=json.dumps(extra).encode(),
                       headers={"Content-Type": "application/json"})
    assert plain.status_code == noisy.status_code == 200, noisy.text
    assert plain.json()["differential"] == noisy.json()["differential"]
    assert plain.json()["phenopacket"] == {"id": "pp-1", "unmapped_measurements": 0,
                                           "onset_from": None}


def test_cohort_rows_written_as_phenopackets_encode_back_to_the_same_rows(tmp_path: Path) -> None:
    """`medimesh data phenopackets`: each file re-reads as its generator row (age to a month)."""
    from medimesh.phenopackets import write_cohort

    cfg = cohort.CohortConfig(n_hospitals=2, seed=3, min_site_size=20, max_site_size=30)
    codes_path, sites = write_cohort(tmp_path, cfg)
    feats = cohort.features()
    age = [f.name for f in feats].index("age_onset_years")
    site = cohort.make_site(cfg, 0)
    rows = np.vstack([site.x_train, site.x_test])
    enc = encode_directory(sites[0][1], load_label_codes(codes_path),
                           request_encoder(HpoAncestors.load()), len(feats))
    assert enc.report.used == enc.report.files_read == len(rows) == sites[0][2]
    assert enc.y.tolist() == np.concatenate([site.y_train, site.y_test]).tolist()
    np.testing.assert_array_equal(np.delete(enc.x, age, axis=1), np.delete(rows, age, axis=1))
    np.testing.assert_allclose(enc.x[:, age], rows[:, age], atol=1 / 24)


# --------------------------------------------------------------- a larger panel (--diseases N)

N_LARGER = 12  # the ten panel diseases plus two Orphanet differentials


def test_a_larger_panel_maps_the_orpha_ids_of_its_differentials() -> None:
    """--diseases 12: each differential's ORPHA id labels its own class; the ten-disease
    mapping still reports it unmappable (it is not one of its classes)."""
    from medimesh.phenopackets import rare_panel_size

    classes, orpha = cohort.class_names(N_LARGER), cohort.orpha_ids(N_LARGER)
    assert len(orpha) == N_LARGER and orpha[:10] == cohort.orpha_ids()
    codes = panel_label_codes(N_LARGER)
    assert codes.classes == classes
    for c in range(N_LARGER):
        assert codes.label([orpha[c].replace("ORPHA", "Orphanet")]) == (classes[c], None)
    assert panel_label_codes().label([orpha[10]]) == (None, "unmappable disease")
    assert rare_panel_size(classes) == N_LARGER and rare_panel_size(cohort.class_names()) == 10
    assert rare_panel_size(("Fabry disease", cohort.OTHER_NAME)) is None
    extended = load_label_codes({"label_codes": {"OMIM:999998": classes[11]}}, codes)
    assert extended.label(["OMIM:999998"]) == (classes[11], None)


def _larger_panel_model(directory: Path) -> None:
    """A pooled --diseases 12 model saved as `medimesh train` saves one (no Ray needed)."""
    from medimesh.bench.baselines import fit_centralized
    from medimesh.features import combine_stats, local_stats, log_transform
    from medimesh.model import TrainConfig
    from medimesh.modelfile import save_model
    from medimesh.sites import dataset_info

    info = dataset_info("rare", {"cohort": {"n_diseases": N_LARGER}})
    k = len(info.class_names)
    rng = np.random.default_rng(4)
    x = np.vstack([cohort.sample_patients(c, 40, rng, n_diseases=N_LARGER) for c in range(k)])
    y = np.repeat(np.arange(k), 40)
    logged = log_transform(x, info.log_mask)
    std, prior = combine_stats([local_stats(logged, y, k)])
    mean = np.where(info.scale_mask, std.mean, 0.0)
    sd = np.where(info.scale_mask, std.std, 1.0)
    z = (logged - mean) / sd
    model = fit_centralized(np.where(np.isnan(z), 0.0, z), y, k, prior, TrainConfig(l2=3e-4), 300)
    final = {"model_hash": model_hash(model), "round": 1, "mean": std.mean, "std": std.std,
             "weights": model.weights, "bias": model.bias}
    save_model(directory, final, info.class_names, info.feature_names, info.log_mask,
               info.scale_mask, None, [])


def test_evaluate_reads_phenopackets_of_a_larger_panel_model(tmp_path: Path) -> None:
    """`medimesh evaluate --model M --phenopackets DIR` for a model trained with --diseases 12:
    phenopackets written by the phenopackets library for the two Orphanet differentials (with
    excluded features and an unknown term) are labelled by their ORPHA ids and scored."""
    import contextlib
    import io

    from google.protobuf.json_format import MessageToJson

    from medimesh.bench.oracle import request_from_row
    from medimesh.cli import build_parser
    from medimesh.phenopackets import to_phenopacket

    feats, classes = cohort.features(N_LARGER), cohort.class_names(N_LARGER)
    orpha = cohort.orpha_ids(N_LARGER)
    _larger_panel_model(tmp_path / "model")
    folder = tmp_path / "packets"
    folder.mkdir()
    rng = np.random.default_rng(11)
    n_excluded = 0
    for c in (10, 11):
        for j, row in enumerate(cohort.sample_patients(c, 15, rng, n_diseases=N_LARGER)):
            body = request_from_row(row, feats)
            body["symptoms"] += ["HP:9999999"] if j == 0 else []  # not an HPO term
            n_excluded += bool(body["excluded_symptoms"])
            pp = to_phenopacket(f"d{c}-{j}", body, orpha[c])
            (folder / f"d{c}-{j:02d}.json").write_text(MessageToJson(pp))
    _write(folder, "fabry-omim.json", _packet([_feature(ANGIOKERATOMA)], disease="OMIM:301500"))
    assert n_excluded > 0
    args = build_parser().parse_args(["evaluate", "--model", str(tmp_path / "model"),
                                      "--phenopackets", str(folder), "--json"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    result = json.loads(out.getvalue())
    assert result["classes"] == list(classes)
    report = result["report"]
    assert report["files_read"] == 31 and report["used"] == result["n"] == 30
    assert report["skipped"] == {"unmappable disease": 1}
    assert report["unknown_terms"] == 2 and report["files_with_unknown_terms"] == 2
    recall = result["per_class_recall"]
    assert recall[10] is not None and recall[11] is not None
    assert all(r is None for i, r in enumerate(recall) if i not in (10, 11))
    assert result["top3"] >= 0.6, result  # chance is 3 / 13


def test_a_larger_panel_cohort_written_as_phenopackets_keeps_its_labels(tmp_path: Path) -> None:
    """`write_cohort` for --diseases 12: a differential's patients carry its ORPHA id and
    re-read as its class (not as "Other"), in the larger panel's columns."""
    from medimesh.phenopackets import write_cohort

    cfg = cohort.CohortConfig(n_hospitals=2, seed=2, min_site_size=40, max_site_size=60,
                              n_diseases=N_LARGER)
    codes_path, sites = write_cohort(tmp_path, cfg)
    feats = cohort.features(N_LARGER)
    site = cohort.make_site(cfg, 0)
    ys = np.concatenate([site.y_train, site.y_test])
    assert np.isin(ys, [10, 11]).any()  # the site has patients of a differential
    enc = encode_directory(sites[0][1], load_label_codes(codes_path, panel_label_codes(N_LARGER)),
                           request_encoder(HpoAncestors.load(), N_LARGER), len(feats))
    assert enc.report.used == enc.report.files_read == len(ys)
    assert enc.y.tolist() == ys.tolist()
    age = [f.name for f in feats].index("age_onset_years")
    rows = np.vstack([site.x_train, site.x_test])
    np.testing.assert_array_equal(np.delete(enc.x, age, axis=1), np.delete(rows, age, axis=1))


# ------------------------------------------------------------------------ command line


def test_site_and_mapping_mistakes_stop_in_the_driver_with_one_line(tmp_path: Path) -> None:
    """Mixed sites without a spec, a bad mapping, a wrong spec column: errors before Ray."""
    from medimesh.actors.runtime import RunConfig, site_descriptors
    from medimesh.cli import _site_kind, build_parser, cmd_evaluate
    from medimesh.errors import ConfigError, MediMeshError

    (tmp_path / "pp").mkdir()
    (tmp_path / "a.csv").write_text("diagnosis\n")
    mixed = build_parser().parse_args(
        ["train", "--site", f"a={tmp_path / 'a.csv'}", "--site", f"b={tmp_path / 'pp'}"])
    with pytest.raises(MediMeshError, match="need --spec"):
        _site_kind(mixed)
    dirs = build_parser().parse_args(["train", "--site", f"b={tmp_path / 'pp'}"])
    assert _site_kind(dirs) == "phenopackets"
    bad = RunConfig(dataset="phenopackets", csv_sites=(("b", str(tmp_path / "pp")),),
                    label_codes={"label_codes": {"OMIM:301500": "Fabry"}})
    with pytest.raises(ConfigError, match="not a class"):
        site_descriptors(bad)
    wrong = RunConfig(dataset="csv", spec=SPEC, csv_sites=(("b", str(tmp_path / "pp")),),
                      label_codes={"spec_columns": {"symptoms": "onset"}})
    with pytest.raises(ConfigError, match="not a codes feature"):
        site_descriptors(wrong)
    ok = RunConfig(dataset="csv", spec=SPEC, csv_sites=(("b", str(tmp_path / "pp")),),
                   label_codes=SPEC_CODES)
    assert [d.kind for d in site_descriptors(ok)] == ["phenopackets"]
    with pytest.raises(MediMeshError, match="--model"):
        cmd_evaluate(build_parser().parse_args(["evaluate", "--phenopackets", str(tmp_path)]))
