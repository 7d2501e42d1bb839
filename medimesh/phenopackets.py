"""GA4GH Phenopackets v2 in, MediMesh patients out: a site format and a query format.

A phenopacket (the GA4GH schema, JSON in the protobuf JSON mapping) is read with the
``phenopackets`` package (:func:`google.protobuf.json_format.Parse` into
``phenopackets.Phenopacket``), so a file the schema does not describe is refused, never guessed
at. :func:`convert` turns one into the oracle's :class:`~medimesh.diagnosis.PatientRequest`
plus a label; the request is then encoded by the oracle's own encoder
(:meth:`DiagnosisEngine.encode <medimesh.diagnosis.DiagnosisEngine.encode>`), both when a
hospital trains on a directory of phenopackets (:func:`encode_directory`) and when
``POST /diagnose/phenopacket`` or ``medimesh evaluate --phenopackets`` scores one, so a
phenopacket lands in the same model columns at training and at query time. See
``docs/phenopackets.md``.

What is read (everything else is ignored):

* ``phenotypicFeatures``: observed terms → ``symptoms``; ``excluded: true`` → ``excluded_symptoms``.
* onset age: the onset of the (first, non-excluded) disease if it is an age, else the earliest
  onset among the observed features; an ``Age`` (ISO 8601 duration), an ``AgeRange``
  (midpoint) or an HPO onset class (midpoint of its HPO definition). Anything else, or an age
  outside 0-130 years: unknown.
* ``subject.sex``: MALE → "M", FEMALE → "F", other or unset → unknown.
* ``interpretations[].diagnosis.genomicInterpretations``: a gene is a finding when the
  interpretation is not REJECTED and its variant is (likely) pathogenic (ACMG) or its status is
  CAUSATIVE / CONTRIBUTORY. Any genomic interpretation, or an UNSOLVED interpretation, means
  genetic testing was done (``sequenced: true``); none says nothing (``sequenced: null``).
* ``measurements``: only assays named in the mapping's ``assay_codes`` (assay id → panel
  biomarker), with a quantity in a unit the oracle accepts; the rest are counted as unmapped.
* the label: ``diseases`` (not excluded) and ``interpretations[].diagnosis.disease`` ids,
  mapped to class names by :class:`LabelCodes` (built in: the panel's ORPHA ids).

Pure: no Ray, no I/O except the explicit file readers. Reports carry counts and file names of
unreadable files only - never a term, a value or a label of a patient.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from medimesh.errors import MediMeshError

__all__ = [
    "HPO_ONSET_YEARS",
    "Converted",
    "DirectoryReport",
    "EncodedDirectory",
    "LabelCodes",
    "PhenopacketError",
    "convert",
    "encode_directory",
    "iso8601_years",
    "load_label_codes",
    "panel_label_codes",
    "parse_phenopacket",
    "phenopacket_files",
    "rare_panel_size",
    "read_phenopacket",
    "request_encoder",
    "spec_encoder",
    "spec_label_codes",
    "to_phenopacket",
    "write_cohort",
]

Encoder = Callable[[Any], tuple[np.ndarray, list[str], dict[str, Any]]]

# Representative age (years) of each HPO onset class: the midpoint of the range its HPO
# definition gives (hp.obo, 2025 release), a stated assumption for the open-ended ones.
HPO_ONSET_YEARS: Final[Mapping[str, float]] = {
    "HP:0030674": 0.0,  # Antenatal onset (before birth): read as 0
    "HP:0011460": 0.0,  # Embryonal onset
    "HP:0011461": 0.0,  # Fetal onset
    "HP:0003577": 0.0,  # Congenital onset (at birth)
    "HP:0003623": 0.04,  # Neonatal onset (first 28 days)
    "HP:0003593": 0.5,  # Infantile onset (28 days to 1 year)
    "HP:0011463": 3.0,  # Childhood onset (1 to 5 years)
    "HP:0003621": 10.0,  # Juvenile onset (5 to 15 years)
    "HP:0410280": 7.5,  # Pediatric onset (0 to 15 years)
    "HP:0011462": 28.0,  # Young adult onset (16 to 40 years)
    "HP:0003596": 50.0,  # Middle age onset (40 to 60 years)
    "HP:0003584": 70.0,  # Late onset (after 60 years): assumed 70
    "HP:0003581": 40.0,  # Adult onset (16 years or later): assumed 40
}

_DURATION: Final = re.compile(
    r"P(?!$)(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
    r"(?:T(?:\d+(?:\.\d+)?H)?(?:\d+(?:\.\d+)?M)?(?:\d+(?:\.\d+)?S)?)?"
)
_PATHOGENIC: Final = frozenset({"PATHOGENIC", "LIKELY_PATHOGENIC"})
_CAUSAL_STATUS: Final = frozenset({"CAUSATIVE", "CONTRIBUTORY"})
_PREFIXES: Final[Mapping[str, str]] = {"ORPHANET": "ORPHA", "MIM": "OMIM"}


class PhenopacketError(MediMeshError, ValueError):
    """A phenopacket (or a label-code mapping) cannot be read; ``source`` names the file."""

    def __init__(self, source: str, message: str) -> None:
        safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(f"{source}: {safe}" if source else safe)
        self.source = source
        self.message = safe


# ------------------------------------------------------------------------------ label codes


def _norm_code(code: str) -> str:
    """``orphanet:324`` → ``ORPHA:324``; prefixes are case-insensitive, local parts kept."""
    prefix, sep, local = code.strip().partition(":")
    if not sep:
        return code.strip().upper()
    prefix = prefix.strip().upper()
    return f"{_PREFIXES.get(prefix, prefix)}:{local.strip()}"


@dataclass(frozen=True)
class LabelCodes:
    """Disease ids (ORPHA, OMIM, MONDO, …) → class names, and assay ids → biomarkers.

    ``unmapped`` (opt-in) is the class of a phenopacket whose diseases are all outside
    ``codes`` (e.g. "Other / none of these"); unset, such a file is skipped and counted.
    """

    codes: Mapping[str, str]
    classes: tuple[str, ...]
    unmapped: str | None = None
    assays: Mapping[str, str] = field(default_factory=dict)
    # CSV-spec consortia: which spec feature receives what (see :func:`spec_encoder`).
    columns: Mapping[str, Any] = field(default_factory=dict)

    def label(self, ids: Sequence[str]) -> tuple[str | None, str | None]:
        """(class, None) or (None, reason) for a phenopacket's disease ids."""
        if not ids:
            return None, "no diagnosis"
        found = {self.codes[c] for c in map(_norm_code, ids) if c in self.codes}
        if len(found) > 1:
            return None, "ambiguous diagnosis"
        if found:
            return found.pop(), None
        if self.unmapped is not None:
            return self.unmapped, None
        return None, "unmappable disease"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as a site descriptor ships it (vocabulary, never patient data)."""
        return {"label_codes": dict(self.codes), "unmapped_disease": self.unmapped,
                "assay_codes": dict(self.assays), "classes": list(self.classes),
                "spec_columns": dict(self.columns)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LabelCodes:
        return cls(dict(doc["label_codes"]), tuple(doc["classes"]), doc.get("unmapped_disease"),
                   dict(doc.get("assay_codes", {})), dict(doc.get("spec_columns", {})))


def panel_label_codes(n_diseases: int | None = None) -> LabelCodes:
    """The built-in rare panel: its ORPHA ids → class names, for a model of ``n_diseases``
    (default the ten of ``rare_panel.json``; ``--diseases N`` adds the N - 10 Orphanet
    differentials, each under its own ORPHA id, ``medimesh.data.cohort.orpha_ids``).

    The panel carries ORPHA ids only; OMIM or MONDO ids need an explicit mapping file
    (:func:`load_label_codes`).
    """
    from medimesh.data import cohort

    n = cohort.PANEL_SIZE if n_diseases is None else n_diseases
    classes = cohort.class_names(n)
    codes = {_norm_code(o): c for o, c in zip(cohort.orpha_ids(n), classes, strict=False)}
    return LabelCodes(codes, classes)


def rare_panel_size(classes: Sequence[str]) -> int | None:
    """The rare panel's ``n_diseases`` for a model with these classes (``--diseases N``), or
    None when the classes are not a rare panel's (e.g. a CSV-spec consortium's)."""
    from medimesh.data import cohort

    return cohort.panel_size_for(classes)


def spec_label_codes(classes: Sequence[str]) -> LabelCodes:
    """A CSV-spec consortium's base: its classes, no built-in codes (give a mapping file)."""
    return LabelCodes({}, tuple(classes))


def load_label_codes(
    source: Path | str | Mapping[str, Any] | None, base: LabelCodes | None = None
) -> LabelCodes:
    """The panel codes (or ``base``) extended by a mapping file; ``None`` → ``base`` as is.

    File format (JSON)::

        {"label_codes": {"OMIM:301500": "Fabry disease", "MONDO:0010526": "Fabry disease"},
         "unmapped_disease": "Other / none of these",
         "assay_codes": {"LOINC:2157-6": "ck"}}

    Every class name must be one of the consortium's classes; every key is optional.
    """
    base = base or panel_label_codes()
    if source is None:
        return base
    name = "label codes"
    if isinstance(source, Mapping):
        doc: Any = source
    else:
        path = Path(source)
        name = path.name
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise PhenopacketError(name, f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(doc, Mapping):
        raise PhenopacketError(name, "expected a JSON object")
    unknown = set(doc) - {"label_codes", "unmapped_disease", "assay_codes", "spec_columns"}
    if unknown:
        raise PhenopacketError(name, f"unknown key {sorted(unknown)[0]!r} (allowed: "
                                     "label_codes, unmapped_disease, assay_codes, spec_columns)")
    codes = dict(base.codes)
    raw = doc.get("label_codes", {})
    if not isinstance(raw, Mapping):
        raise PhenopacketError(name, "label_codes: expected an object {disease id: class}")
    for code, cls in raw.items():
        if not isinstance(cls, str) or cls not in base.classes:
            raise PhenopacketError(
                name, f"label_codes.{code}: {cls!r} is not a class; expected one of "
                      f"{list(base.classes)}")
        if ":" not in str(code):
            raise PhenopacketError(name, f"label_codes.{code}: expected PREFIX:ID")
        codes[_norm_code(str(code))] = cls
    unmapped = doc.get("unmapped_disease", base.unmapped)
    if unmapped is not None and unmapped not in base.classes:
        raise PhenopacketError(name, f"unmapped_disease: {unmapped!r} is not a class")
    assays = dict(base.assays)
    raw_assays = doc.get("assay_codes", {})
    if not isinstance(raw_assays, Mapping):
        raise PhenopacketError(name, "assay_codes: expected an object {assay id: biomarker}")
    for code, marker in raw_assays.items():
        if not isinstance(marker, str) or not marker:
            raise PhenopacketError(name, f"assay_codes.{code}: expected a biomarker name")
        assays[_norm_code(str(code))] = marker
    columns = doc.get("spec_columns", base.columns)
    if not isinstance(columns, Mapping):
        raise PhenopacketError(name, "spec_columns: expected an object")
    return LabelCodes(codes, base.classes, unmapped, assays, dict(columns))


# ---------------------------------------------------------------------------------- parsing


def parse_phenopacket(doc: str | bytes | Mapping[str, Any], source: str = "") -> Any:
    """A ``phenopackets.Phenopacket`` from JSON text or a parsed object; schema-checked.

    Unknown fields, wrong types and bad enum values raise :class:`PhenopacketError`.
    """
    import phenopackets
    from google.protobuf import json_format

    message = phenopackets.Phenopacket()
    try:
        if isinstance(doc, str | bytes):
            json_format.Parse(doc, message)
        elif isinstance(doc, Mapping):
            json_format.ParseDict(dict(doc), message)
        else:
            raise PhenopacketError(source, "expected a JSON object")
    except PhenopacketError:
        raise
    except json_format.ParseError as exc:
        raise PhenopacketError(source, f"not a valid phenopacket: {exc}") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise PhenopacketError(source, f"not a valid phenopacket: {exc}") from None
    return message


def read_phenopacket(path: Path) -> Any:
    """Parse one phenopacket file; any problem is a :class:`PhenopacketError` naming it."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PhenopacketError(path.name, "not UTF-8 text") from None
    return parse_phenopacket(text, path.name)


def phenopacket_files(directory: Path) -> list[Path]:
    """The ``*.json`` files under ``directory`` (recursive, hidden files skipped), sorted."""
    return sorted(
        p for p in directory.rglob("*.json")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


# ------------------------------------------------------------------------------- conversion


def iso8601_years(duration: str) -> float | None:
    """``P3Y6M`` → 3.5; weeks and days count too (365.25-day years); None if unreadable."""
    m = _DURATION.fullmatch(duration.strip())
    if m is None:
        return None
    y, mo, w, d = (float(g) if g else 0.0 for g in m.groups())
    return y + mo / 12.0 + (w * 7.0 + d) / 365.25


def _age_years(te: Any) -> float | None:
    """Years from a TimeElement: age, age range (midpoint) or an HPO onset class."""
    kind = te.WhichOneof("element")
    if kind == "age":
        return iso8601_years(te.age.iso8601duration)
    if kind == "age_range":
        lo = iso8601_years(te.age_range.start.iso8601duration)
        hi = iso8601_years(te.age_range.end.iso8601duration)
        if lo is None or hi is None:
            return lo if hi is None else hi
        return (lo + hi) / 2.0
    if kind == "ontology_class":
        return HPO_ONSET_YEARS.get(te.ontology_class.id.strip().upper())
    if kind == "gestational_age":
        return 0.0
    return None


def _onset(pp: Any) -> tuple[float | None, str]:
    """Onset age and where it came from ("disease", "feature" or "" when unknown)."""
    for disease in pp.diseases:
        if not disease.excluded and disease.HasField("onset"):
            age = _age_years(disease.onset)
            if age is not None:
                return age, "disease"
    ages = [
        a for f in pp.phenotypic_features
        if not f.excluded and f.HasField("onset") and (a := _age_years(f.onset)) is not None
    ]
    return (min(ages), "feature") if ages else (None, "")


def _gene_findings(pp: Any) -> tuple[list[str], bool | None]:
    """(pathogenic gene symbols, sequenced?) from the genomic interpretations."""
    import phenopackets

    genes: list[str] = []
    tested = False
    gi_cls = phenopackets.GenomicInterpretation
    for interp in pp.interpretations:
        if interp.progress_status == phenopackets.Interpretation.UNSOLVED:
            tested = True
        for gi in interp.diagnosis.genomic_interpretations:
            tested = True
            if gi.interpretation_status == gi_cls.REJECTED:
                continue
            status = gi_cls.InterpretationStatus.Name(gi.interpretation_status)
            symbol = ""
            acmg = ""
            if gi.WhichOneof("call") == "gene":
                symbol = gi.gene.symbol
            else:
                vi = gi.variant_interpretation
                symbol = vi.variation_descriptor.gene_context.symbol
                acmg = phenopackets.AcmgPathogenicityClassification.Name(
                    vi.acmg_pathogenicity_classification
                )
            symbol = symbol.strip()
            if symbol.upper().removeprefix("GENE:").strip() and (
                acmg in _PATHOGENIC or status in _CAUSAL_STATUS
            ):
                genes.append(symbol)
    return list(dict.fromkeys(genes)), (True if tested else None)


def _disease_ids(pp: Any) -> list[str]:
    ids = [d.term.id for d in pp.diseases if not d.excluded and d.term.id.strip()]
    ids += [
        i.diagnosis.disease.id for i in pp.interpretations if i.diagnosis.disease.id.strip()
    ]
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class Converted:
    """One phenopacket as a request, its label (or why none) and what was left out."""

    id: str
    request: Any  # medimesh.diagnosis.PatientRequest
    label: str | None
    problem: str | None
    unmapped_measurements: int = 0
    onset_source: str = ""


def convert(pp: Any, codes: LabelCodes | None = None) -> Converted:
    """A parsed phenopacket → :class:`Converted`; ``codes`` None: no label (query time)."""
    import phenopackets

    from medimesh.diagnosis import MAX_AGE_YEARS, Measurement, PatientRequest

    observed: list[str] = []
    excluded: list[str] = []
    for f in pp.phenotypic_features:
        term = f.type.id.strip()
        if term:
            (excluded if f.excluded else observed).append(term)
    sex_name = phenopackets.Sex.Name(pp.subject.sex)
    sex: Literal["F", "M"] | None = {"MALE": "M", "FEMALE": "F"}.get(sex_name)  # type: ignore[assignment]
    age, source = _onset(pp)
    if age is not None and not (math.isfinite(age) and 0.0 <= age <= MAX_AGE_YEARS):
        age, source = None, ""  # e.g. "P200Y": no usable onset, counted as unknown
    genes, sequenced = _gene_findings(pp)
    markers: dict[str, Measurement] = {}
    unmapped = 0
    assays = codes.assays if codes is not None else {}
    for m in pp.measurements:
        name = assays.get(_norm_code(m.assay.id)) if m.assay.id else None
        if name is None or m.WhichOneof("measurement_value") != "value" or (
            m.value.WhichOneof("value") != "quantity"
        ):
            unmapped += 1
            continue
        q = m.value.quantity
        unit = q.unit.label.strip() or q.unit.id.strip().removeprefix("UCUM:")
        markers[name] = Measurement(float(q.value), unit)
    request = PatientRequest(
        symptoms=tuple(dict.fromkeys(observed)),
        biomarkers=markers,
        genes=tuple(genes),
        age=age,
        sex=sex,
        excluded_symptoms=tuple(t for t in dict.fromkeys(excluded) if t not in observed),
        sequenced=sequenced,
    )
    label, problem = (None, None) if codes is None else codes.label(_disease_ids(pp))
    return Converted(pp.id, request, label, problem, unmapped, source)


def request_encoder(ontology: Any = None, n_diseases: int | None = None) -> Encoder:
    """The oracle's own request encoder, for the rare panel's columns (``n_diseases``, default
    the ten-disease panel), without a trained model.

    :meth:`DiagnosisEngine.encode` needs the feature layout (and the HPO ontology), not the
    weights: it is bound to an engine over a blank model, so training rows are encoded by the
    very function that encodes a query.
    """
    from medimesh.data import cohort
    from medimesh.diagnosis import DiagnosisEngine, saved_model_for
    from medimesh.model import Model

    n_dis = cohort.PANEL_SIZE if n_diseases is None else n_diseases
    feats = cohort.features(n_dis)
    classes = cohort.class_names(n_dis)
    n, k = len(feats), len(classes)
    blank = Model(np.zeros((n, k), np.float32), np.zeros(k, np.float32))
    saved = saved_model_for(blank, feats, classes, np.zeros(n), np.ones(n))
    return DiagnosisEngine(saved, feats, ontology).encode


_SPEC_KEYS: Final = {"symptoms": "codes", "genes": "codes", "age": "numeric",
                     "sex": "categorical"}


def spec_encoder(spec: Any, codes: LabelCodes, ontology: Any = None) -> Encoder:
    """For a CSV-spec consortium: a request → the spec's columns, through the spec's own CSV
    encoders (:func:`medimesh.spec.row_encoder`), as if the phenopacket were a CSV row.

    ``codes.columns`` (the mapping file's ``spec_columns``) names the spec feature for each
    part: ``symptoms`` (a codes feature; excluded terms go to its ``excluded_column``),
    ``genes`` (a codes feature of gene symbols), ``age`` (numeric, years), ``sex`` (categorical;
    ``sex_levels`` maps "M"/"F" to its levels, default the same letters). ``assay_codes`` map
    assays to numeric features; a value in a unit other than the feature's ``unit`` is invalid.
    A spec feature nothing maps to reads as an empty cell (missing).
    """
    from medimesh.diagnosis import ValidationError
    from medimesh.spec import CategoricalFeature, CodesFeature, NumericFeature, RowError
    from medimesh.spec import row_encoder as spec_rows

    by_name = {f.name: f for f in spec.features}
    kinds = {CodesFeature: "codes", NumericFeature: "numeric", CategoricalFeature: "categorical"}
    cols = dict(codes.columns)
    sex_levels = cols.pop("sex_levels", {"M": "M", "F": "F"})
    for key, target in cols.items():
        want = _SPEC_KEYS.get(key)
        if want is None:
            raise PhenopacketError("spec_columns", f"unknown key {key!r} (allowed: "
                                   f"{', '.join(sorted(_SPEC_KEYS))}, sex_levels)")
        feature = by_name.get(target)
        if feature is None or kinds[type(feature)] != want:
            raise PhenopacketError("spec_columns", f"{key}: {target!r} is not a {want} feature "
                                                   "of the spec")
    for assay, target in codes.assays.items():
        if not isinstance(by_name.get(target), NumericFeature):
            raise PhenopacketError("assay_codes", f"{assay}: {target!r} is not a numeric "
                                                  "feature of the spec")
    if not isinstance(sex_levels, Mapping) or ("sex" in cols and any(
        v not in by_name[cols["sex"]].levels for v in sex_levels.values()
    )):
        raise PhenopacketError("spec_columns", "sex_levels: expected {M: level, F: level} with "
                                               "levels of the sex feature")
    encode_row = spec_rows(spec, ontology)

    def encode(req: Any) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        cells: dict[str, str] = {}
        if "symptoms" in cols:
            f = by_name[cols["symptoms"]]
            cells[f.name] = f.separator.join(req.symptoms)
            if f.excluded_column is not None:
                cells[f.excluded_column] = f.separator.join(req.excluded_symptoms)
        if "genes" in cols:
            f = by_name[cols["genes"]]
            cells[f.name] = f.separator.join(req.genes)
        if "age" in cols and req.age is not None:
            cells[cols["age"]] = repr(float(req.age))
        if "sex" in cols and req.sex is not None:
            cells[cols["sex"]] = str(sex_levels.get(req.sex, ""))
        for name, m in req.biomarkers.items():
            unit = by_name[name].unit
            if unit is not None and m.unit.strip() != unit:
                raise ValidationError(f"biomarkers.{name}.unit",
                                      f"unit {m.unit!r} not accepted; use {unit}")
            cells[name] = repr(float(m.value))
        try:
            row, unknown = encode_row(cells)
        except RowError as exc:
            raise ValidationError(exc.column or "row", exc.message) from None
        return row, sorted(unknown), {}

    return encode


# ------------------------------------------------------------------------------- directories


@dataclass(frozen=True)
class DirectoryReport:
    """Counts for one directory of phenopackets: safe to show outside the hospital.

    ``skipped`` counts files per reason; ``malformed`` names (at most ten) unreadable files.
    """

    files_read: int
    used: int
    skipped: Mapping[str, int]
    unknown_terms: int
    files_with_unknown_terms: int
    unmapped_measurements: int
    onset_unknown: int
    malformed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "files_read": self.files_read,
            "used": self.used,
            "skipped": dict(self.skipped),
            "unknown_terms": self.unknown_terms,
            "files_with_unknown_terms": self.files_with_unknown_terms,
            "unmapped_measurements": self.unmapped_measurements,
            "onset_unknown": self.onset_unknown,
            "malformed_files": list(self.malformed),
        }


@dataclass(frozen=True, eq=False)
class EncodedDirectory:
    """Raw rows (the encoder's layout), class indices into ``codes.classes``, the report."""

    x: np.ndarray
    y: np.ndarray
    report: DirectoryReport


MAX_NAMED: Final = 10


def encode_directory(
    directory: Path | str, codes: LabelCodes, encode: Encoder, width: int,
    files: Iterable[Path] | None = None,
) -> EncodedDirectory:
    """Read, convert and encode every phenopacket under ``directory``; never raises per file.

    A file is skipped (and counted by reason) when it is not a valid phenopacket
    ("malformed"), has no usable label ("no diagnosis", "unmappable disease", "ambiguous
    diagnosis") or fails the oracle's request checks ("invalid", e.g. a unit it does not
    convert). Unknown HPO terms are dropped from the row and counted.
    """
    from medimesh.diagnosis import ValidationError

    directory = Path(directory)
    if not directory.is_dir():
        raise PhenopacketError(str(directory), "not a directory")
    paths = list(files) if files is not None else phenopacket_files(directory)
    index = {c: i for i, c in enumerate(codes.classes)}
    rows: list[np.ndarray] = []
    labels: list[int] = []
    skipped: Counter[str] = Counter()
    malformed: list[str] = []
    unknown_terms = files_unknown = unmapped = onset_unknown = 0
    for path in paths:
        try:
            pp = read_phenopacket(path)
        except (PhenopacketError, OSError):
            skipped["malformed"] += 1
            if len(malformed) < MAX_NAMED:
                malformed.append(str(path.relative_to(directory)))
            continue
        conv = convert(pp, codes)
        if conv.label is None:
            skipped[conv.problem or "no diagnosis"] += 1
            continue
        try:
            x, unknown, _mapped = encode(conv.request)
        except ValidationError:
            skipped["invalid"] += 1
            continue
        rows.append(x)
        labels.append(index[conv.label])
        unknown_terms += len(unknown)
        files_unknown += bool(unknown)
        unmapped += conv.unmapped_measurements
        onset_unknown += conv.request.age is None
    x_all = np.array(rows, dtype=np.float64).reshape(len(rows), width)
    report = DirectoryReport(
        files_read=len(paths),
        used=len(rows),
        skipped=dict(sorted(skipped.items())),
        unknown_terms=unknown_terms,
        files_with_unknown_terms=files_unknown,
        unmapped_measurements=unmapped,
        onset_unknown=onset_unknown,
        malformed=tuple(malformed),
    )
    return EncodedDirectory(x_all, np.array(labels, dtype=np.int64), report)


# ------------------------------------------------------------------- synthetic phenopackets

#: The disease term given to synthetic "Other / none of these" patients ("disease", MONDO's
#: root: not a panel disease); ``write_cohort``'s mapping file sends it to the Other class.
SYNTHETIC_OTHER: Final = "MONDO:0000001"
#: Local assay codes of the synthetic cohort's biomarkers (not LOINC): ``MEDIMESH:<name>``.
ASSAY_PREFIX: Final = "MEDIMESH:"


def _iso_age(years: float) -> str:
    months = round(years * 12)
    return f"P{months // 12}Y{months % 12}M"


def to_phenopacket(pid: str, body: Mapping[str, Any], disease: str) -> Any:
    """A ``phenopackets.Phenopacket`` for a ``/diagnose``-shaped body and a disease id.

    Observed and excluded features, the onset as the disease's onset age, sex, biomarkers as
    measurements with ``MEDIMESH:<name>`` assays, and the genes as pathogenic variant calls of a
    solved interpretation (``sequenced`` with no gene: an unsolved one, i.e. tested, nothing
    found).
    """
    import phenopackets as pps

    sex = {"M": pps.Sex.MALE, "F": pps.Sex.FEMALE}.get(body.get("sex") or "",
                                                        pps.Sex.UNKNOWN_SEX)
    pp = pps.Phenopacket(id=pid, subject=pps.Individual(id=f"{pid}-subject", sex=sex))
    for term in body.get("symptoms", []):
        pp.phenotypic_features.append(pps.PhenotypicFeature(type=pps.OntologyClass(id=term)))
    for term in body.get("excluded_symptoms", []):
        pp.phenotypic_features.append(
            pps.PhenotypicFeature(type=pps.OntologyClass(id=term), excluded=True)
        )
    d = pps.Disease(term=pps.OntologyClass(id=disease))
    if body.get("age") is not None:
        d.onset.CopyFrom(pps.TimeElement(age=pps.Age(iso8601duration=_iso_age(body["age"]))))
    pp.diseases.append(d)
    for name, m in body.get("biomarkers", {}).items():
        pp.measurements.append(pps.Measurement(
            assay=pps.OntologyClass(id=f"{ASSAY_PREFIX}{name}", label=name),
            value=pps.Value(quantity=pps.Quantity(
                unit=pps.OntologyClass(id=f"UCUM:{m['unit']}", label=m["unit"]),
                value=float(m["value"]),
            )),
        ))
    genes = list(body.get("genes", []))
    if genes or body.get("sequenced"):
        calls = [
            pps.GenomicInterpretation(
                subject_or_biosample_id=f"{pid}-subject",
                interpretation_status=pps.GenomicInterpretation.CAUSATIVE,
                variant_interpretation=pps.VariantInterpretation(
                    acmg_pathogenicity_classification=pps.PATHOGENIC,
                    variation_descriptor=pps.VariationDescriptor(
                        id=f"{pid}-{g}", gene_context=pps.GeneDescriptor(value_id=g, symbol=g)
                    ),
                ),
            )
            for g in genes
        ]
        status = pps.Interpretation.SOLVED if genes else pps.Interpretation.UNSOLVED
        pp.interpretations.append(pps.Interpretation(
            id=f"{pid}-interpretation", progress_status=status,
            diagnosis=pps.Diagnosis(disease=pps.OntologyClass(id=disease),
                                    genomic_interpretations=calls),
        ))
    pp.meta_data.CopyFrom(pps.MetaData(created_by="medimesh data phenopackets",
                                       phenopacket_schema_version="2.0"))
    return pp


def write_cohort(out_dir: Path, config: Any) -> tuple[Path, list[tuple[str, Path, int]]]:
    """The synthetic rare cohort (``cohort.CohortConfig``) as one directory of phenopackets per
    site (train and test rows alike) plus ``codes.json``; returns (codes path, sites)."""
    from google.protobuf.json_format import MessageToJson

    from medimesh.bench.oracle import request_from_row
    from medimesh.data import cohort

    n_diseases = int(getattr(config, "n_diseases", cohort.PANEL_SIZE))
    feats = cohort.features(n_diseases)
    classes = cohort.class_names(n_diseases)
    orpha = dict(zip(classes, cohort.orpha_ids(n_diseases), strict=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    sites: list[tuple[str, Path, int]] = []
    for i in range(config.n_hospitals):
        site = cohort.make_site(config, i)
        folder = out_dir / site.name
        folder.mkdir(exist_ok=True)
        rows = np.vstack([site.x_train, site.x_test])
        ys = np.concatenate([site.y_train, site.y_test])
        for j, (row, y) in enumerate(zip(rows, ys, strict=True)):
            body = request_from_row(row, feats)
            disease = orpha.get(classes[int(y)], SYNTHETIC_OTHER)
            pp = to_phenopacket(f"{site.name}-{j:04d}", body, disease)
            (folder / f"{site.name}-{j:04d}.json").write_text(MessageToJson(pp) + "\n")
        sites.append((site.name, folder, len(ys)))
    codes = out_dir / "codes.json"
    codes.write_text(json.dumps({
        "unmapped_disease": classes[-1],
        "assay_codes": {f"{ASSAY_PREFIX}{f.name}": f.name for f in feats if f.kind == "lognormal"},
    }, indent=1) + "\n")
    return codes, sites
