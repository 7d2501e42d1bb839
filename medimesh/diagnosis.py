"""One patient in, a ranked differential out: the oracle's pure core.

Why a separate module: the Serve deployment, the CLI and tests all need the same validation
and explanation logic, and it must stay testable in milliseconds without Ray or FastAPI.

The request speaks the cohort's vocabulary (:func:`medimesh.data.cohort.features`): HPO ids for
symptoms, named biomarkers with units, ``gene:SYMBOL`` findings, age of onset and sex. Unknown
HPO ids and genes are reported back rather than refused (a clinician's list is rarely a subset
of the panel), but a wrong unit or an unknown biomarker is an error naming the field: a value
silently read in the wrong unit would be worse than no answer. Missing biomarkers stay NaN and
are imputed by the model's standardization (the global mean) with their ``measured:`` indicator
0, so "not measured" is never read as "normal"; symptoms are observed, excluded or not mentioned,
and genetic testing is done or not (issue 14; column names in :mod:`medimesh.evidence`).

Explanations are exact for a linear model: with standardized inputs ``z``, the logit of class
``c`` is ``b[c] + Σ_j w[j,c]·z[j]``, so ``z[j]·(w[j,c] − mean_c' w[j,c'])`` is how much finding
``j`` moves class ``c`` relative to the average class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from medimesh.errors import MediMeshError
from medimesh.evidence import GENETIC_TESTING_COLUMN, excluded_column, measured_column
from medimesh.model import Model, model_hash

if TYPE_CHECKING:
    from medimesh.data.cohort import FeatureInfo
    from medimesh.hpo import HpoAncestors
    from medimesh.modelfile import SavedModel

__all__ = [
    "DISCLAIMER",
    "TOP_CANDIDATES",
    "UNIT_CONVERSIONS",
    "Candidate",
    "Diagnosis",
    "DiagnosisEngine",
    "Finding",
    "Measurement",
    "PatientRequest",
    "ValidationError",
    "saved_model_for",
]

DISCLAIMER: Final = (
    "Decision support only: this ranked differential comes from a statistical model trained "
    "on synthetic and federated data. It supports, and does not replace, clinical judgement; "
    "confirm any diagnosis with the appropriate specific tests."
)
TOP_CANDIDATES: Final = 3
TOP_FINDINGS: Final = 5
MAX_AGE_YEARS: Final = 130.0

# (unit of the feature, unit given) -> multiply the given value by this factor.
# Kept small on purpose: only unambiguous, assay-independent conversions.
UNIT_CONVERSIONS: Final[Mapping[tuple[str, str], float]] = {
    ("ng/mL", "µg/L"): 1.0,
    ("ng/mL", "ug/L"): 1.0,
    ("ng/mL", "ng/ml"): 1.0,
    ("mg/dL", "g/L"): 100.0,
    ("mg/dL", "mg/L"): 0.1,
    ("U/L", "IU/L"): 1.0,
    ("U/L", "µkat/L"): 60.0,
    ("U/L", "ukat/L"): 60.0,
    ("µg/24 h", "ug/24 h"): 1.0,
    ("µg/24 h", "µg/24h"): 1.0,
    ("µg/24 h", "ug/24h"): 1.0,
    ("µg/24 h", "mg/24 h"): 1000.0,
    ("µg/24 h", "µmol/24 h"): 63.546,  # copper: 63.546 g/mol
    ("µg/24 h", "umol/24 h"): 63.546,
    ("µmol/L/h", "umol/L/h"): 1.0,
    ("nmol/h/mL", "µmol/L/h"): 1.0,
    ("nmol/h/mL", "umol/L/h"): 1.0,
    ("years", "months"): 1.0 / 12.0,
}


class ValidationError(MediMeshError, ValueError):
    """A request field is invalid; ``field`` is its dotted path (e.g. ``biomarkers.ck.unit``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ----------------------------------------------------------------------------------- request


@dataclass(frozen=True, slots=True)
class Measurement:
    """A biomarker value in the unit the lab reported it in."""

    value: float
    unit: str


@dataclass(frozen=True, slots=True)
class PatientRequest:
    """What a clinician knows about one patient, in the consortium's vocabulary.

    Three states per finding (issue 14): ``symptoms`` are OBSERVED HPO terms,
    ``excluded_symptoms`` were checked and found ABSENT, any other term is NOT MENTIONED
    (unknown). A biomarker missing from ``biomarkers`` was NOT MEASURED (never "normal").
    ``genes`` are reported (likely) pathogenic findings; ``sequenced`` says whether genetic
    testing was done (``None``: not said, read as "sequenced iff ``genes`` is non-empty"), so
    ``sequenced=True, genes=()`` means "tested, nothing found"; ``sequenced=False`` with genes
    is refused. A term both observed and excluded (directly or through the ontology) is read
    as observed: a specific positive finding outweighs a negative one.
    """

    symptoms: tuple[str, ...] = ()
    biomarkers: Mapping[str, Measurement] = field(default_factory=dict)
    genes: tuple[str, ...] = ()
    age: float | None = None
    sex: Literal["F", "M"] | None = None
    excluded_symptoms: tuple[str, ...] = ()
    sequenced: bool | None = None

    @property
    def genetic_testing_done(self) -> bool:
        """Whether genetic testing was done: ``sequenced``, or (unsaid) any gene reported."""
        return bool(self.genes) if self.sequenced is None else self.sequenced

    def check(self) -> None:
        """Cross-field rules; raises :class:`ValidationError` naming the offending field."""
        if self.sequenced is not None and not isinstance(self.sequenced, bool):
            raise ValidationError("sequenced", "expected true, false or null")
        if self.sequenced is False and self.genes:
            raise ValidationError(
                "sequenced", "is false but genes lists findings (a finding needs a test)"
            )

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> PatientRequest:
        """Parse a JSON-shaped request; type errors raise :class:`ValidationError` with a path."""
        if not isinstance(doc, Mapping):
            raise ValidationError("body", "expected a JSON object")
        unknown = set(doc) - {
            "symptoms", "excluded_symptoms", "biomarkers", "genes", "sequenced", "age", "sex"
        }
        if unknown:
            raise ValidationError(sorted(unknown)[0], "unknown field")
        symptoms = _str_list(doc.get("symptoms", []), "symptoms")
        excluded = _str_list(doc.get("excluded_symptoms", []), "excluded_symptoms")
        genes = _str_list(doc.get("genes", []), "genes")
        raw = doc.get("biomarkers", {}) or {}
        if not isinstance(raw, Mapping):
            raise ValidationError("biomarkers", "expected an object of {name: {value, unit}}")
        markers: dict[str, Measurement] = {}
        for name, m in raw.items():
            path = f"biomarkers.{name}"
            if not isinstance(m, Mapping):
                raise ValidationError(path, "expected {value, unit}")
            value, unit = m.get("value"), m.get("unit")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(f"{path}.value", "expected a number")
            if not isinstance(unit, str):
                raise ValidationError(f"{path}.unit", "expected a string")
            markers[str(name)] = Measurement(float(value), unit)
        age = doc.get("age")
        if age is not None and (isinstance(age, bool) or not isinstance(age, int | float)):
            raise ValidationError("age", "expected a number of years or null")
        sex = doc.get("sex")
        if sex not in (None, "F", "M"):
            raise ValidationError("sex", "expected 'F', 'M' or null")
        sequenced = doc.get("sequenced")
        if sequenced is not None and not isinstance(sequenced, bool):
            raise ValidationError("sequenced", "expected true, false or null")
        req = cls(
            symptoms, markers, genes, None if age is None else float(age), sex, excluded, sequenced
        )
        req.check()
        return req


def _str_list(value: object, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ValidationError(path, "expected a list of strings")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ValidationError(f"{path}.{i}", "expected a string")
    return tuple(value)


# ------------------------------------------------------------------------------------ answer


@dataclass(frozen=True, slots=True)
class Finding:
    """One of the patient's findings and how far it pushes a candidate (logit units)."""

    feature: str
    label: str
    value: float | bool | str
    unit: str
    contribution: float
    flag: str = ""  # "high" / "low" / "normal" for biomarkers with a reference range

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "contribution": self.contribution,
            "flag": self.flag,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """One diagnosis in the differential; findings are filled for the top candidates."""

    rank: int
    name: str
    probability: float
    findings: tuple[Finding, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "name": self.name,
            "probability": self.probability,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The oracle's answer: every class ranked, the model that said so, and what was ignored."""

    differential: tuple[Candidate, ...]
    model_hash: str
    model_round: int
    unknown_terms: tuple[str, ...]
    mapped_terms: Mapping[str, tuple[str, ...]]
    imputed: tuple[str, ...]
    disclaimer: str = DISCLAIMER

    def to_dict(self) -> dict[str, Any]:
        return {
            "differential": [c.to_dict() for c in self.differential],
            "model_hash": self.model_hash,
            "model_round": self.model_round,
            "unknown_terms": list(self.unknown_terms),
            "mapped_terms": {k: list(v) for k, v in self.mapped_terms.items()},
            "imputed": list(self.imputed),
            "disclaimer": self.disclaimer,
        }


# ------------------------------------------------------------------------------------ engine


def saved_model_for(
    model: Model,
    features: Sequence[FeatureInfo],
    classes: Sequence[str],
    mean: np.ndarray,
    std: np.ndarray,
    *,
    round_: int = 0,
    provenance: list[dict[str, Any]] | None = None,
) -> SavedModel:
    """A :class:`SavedModel` for cohort-shaped features (log lognormal, scale non-binary).

    The store keeps weights and the setup round's statistics separately; this joins them with
    the masks the rare cohort's :func:`medimesh.sites.dataset_info` uses.
    """
    from medimesh.modelfile import SavedModel

    n = len(features)
    mean = np.asarray(mean, dtype=float)
    std = np.asarray(std, dtype=float)
    if model.n_features != n or mean.shape != (n,) or std.shape != (n,):
        raise ValidationError(
            "model", f"expects {n} features, got weights {model.weights.shape}, mean {mean.shape}"
        )
    if model.n_classes != len(classes):
        raise ValidationError("model", f"has {model.n_classes} classes, expected {len(classes)}")
    return SavedModel(
        model=model,
        model_hash=model_hash(model),
        classes=tuple(classes),
        feature_names=tuple(f.name for f in features),
        log_mask=np.array([f.kind == "lognormal" for f in features]),
        scale_mask=np.array([f.kind != "binary" for f in features]),
        mean=mean,
        std=std,
        spec=None,
        provenance=list(provenance or []),
        round=round_,
    )


class DiagnosisEngine:
    """Validates a :class:`PatientRequest`, scores it and explains the top candidates.

    Immutable after construction, so the oracle can swap engines with one reference
    assignment and a request never sees a half-updated model. ``ontology`` (optional) maps
    alt ids and more specific HPO terms onto the panel's terms (the true-path rule).
    """

    def __init__(
        self,
        saved: SavedModel,
        features: tuple[FeatureInfo, ...],
        ontology: HpoAncestors | None = None,
    ) -> None:
        names = tuple(f.name for f in features)
        if saved.feature_names != names:
            raise ValidationError("model", "feature names do not match the cohort's features")
        self.saved = saved
        self.features = features
        self._ontology = ontology
        self._index = {n: j for j, n in enumerate(names)}
        self._symptoms = {f.name for f in features if f.name.startswith("HP:")}
        self._markers = {f.name: f for f in features if f.kind == "lognormal"}
        self._genes = {f.name[5:].upper(): f.name for f in features if f.name.startswith("gene:")}
        w = np.asarray(saved.model.weights, dtype=np.float64)
        self._relative = w - w.mean(axis=1, keepdims=True)
        self._below = self._descendants()

    @property
    def model_hash(self) -> str:
        return self.saved.model_hash

    @property
    def round(self) -> int:
        return self.saved.round

    # -- request -> raw row

    def _resolve(self, term: str) -> str | None:
        """Primary HPO id of a term (alt ids mapped), or None if the ontology lacks it."""
        onto = self._ontology
        if onto is None or term not in onto:
            return None
        return onto.resolve(term)

    def _symptom_columns(
        self, symptoms: Sequence[str]
    ) -> tuple[set[str], list[str], dict[str, tuple[str, ...]]]:
        """Observed terms and, by the true-path rule, every panel ancestor of each (with an
        ontology; a term outside the panel counts through its panel ancestors)."""
        present: set[str] = set()
        unknown: list[str] = []
        mapped: dict[str, tuple[str, ...]] = {}
        for term in symptoms:
            t = term.strip().upper()
            onto = self._ontology
            primary = t if t in self._symptoms else self._resolve(t)
            if primary is None:
                unknown.append(term)
                continue
            above = onto.ancestors(primary) if onto is not None and primary in onto else ()
            hits = tuple(sorted(a for a in (primary, *above) if a in self._symptoms))
            if not hits:
                unknown.append(term)
                continue
            present.update(hits)
            if t not in self._symptoms:  # a panel term's implied ancestors go unsaid
                mapped[term] = hits
        return present, unknown, mapped

    def _descendants(self) -> dict[str, tuple[str, ...]]:
        """Panel terms under each HPO term (itself included): what excluding it rules out."""
        out: dict[str, set[str]] = {}
        onto = self._ontology
        for t in self._symptoms:
            out.setdefault(t, set()).add(t)
            if onto is not None and t in onto:
                for a in onto.ancestors(t):
                    out.setdefault(a, set()).add(t)
        return {k: tuple(sorted(v)) for k, v in out.items()}

    def _excluded_columns(
        self, excluded: Sequence[str]
    ) -> tuple[set[str], list[str], dict[str, tuple[str, ...]]]:
        """Excluded terms and every panel term below each (absent parent: absent children)."""
        absent: set[str] = set()
        unknown: list[str] = []
        mapped: dict[str, tuple[str, ...]] = {}
        below = self._below
        for term in excluded:
            t = term.strip().upper()
            primary = t if t in self._symptoms else self._resolve(t)
            hits = below.get(primary, ()) if primary is not None else ()
            if not hits:
                unknown.append(term)
                continue
            absent.update(hits)
            if t not in self._symptoms:
                mapped[term] = hits
        return absent, unknown, mapped

    def _marker_value(self, name: str, m: Measurement) -> float:
        info = self._markers.get(name)
        path = f"biomarkers.{name}"
        if info is None:
            known = sorted(self._markers)
            raise ValidationError(path, f"unknown biomarker; expected one of {known}")
        if not math.isfinite(m.value):
            raise ValidationError(f"{path}.value", "must be a finite number")
        if m.value < 0:
            raise ValidationError(f"{path}.value", "must be >= 0")
        unit = m.unit.strip()
        if unit == info.unit:
            factor = 1.0
        elif (info.unit, unit) in UNIT_CONVERSIONS:
            factor = UNIT_CONVERSIONS[(info.unit, unit)]
        else:
            accepted = [info.unit, *(g for (u, g) in UNIT_CONVERSIONS if u == info.unit)]
            raise ValidationError(
                f"{path}.unit", f"unit {m.unit!r} not accepted; use one of {accepted}"
            )
        # Lognormal columns are logged: a reported 0 means "below detection", not "missing".
        return max(m.value * factor, 1e-3)

    def _set(self, x: np.ndarray, column: str, value: float) -> None:
        """Set a column if the model has it (older layouts lack the indicator columns)."""
        j = self._index.get(column)
        if j is not None:
            x[j] = value

    def encode(self, req: PatientRequest) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        """Raw feature row (natural units, NaN = unknown), unknown terms and mapped terms.

        Observed symptoms set their column and their panel ancestors' (true path); excluded
        symptoms set ``excluded:<term>`` for the term and every panel term below it, unless that
        term is observed (a specific positive finding outweighs a broader negative one); a term
        in neither list leaves both 0. Each biomarker sets its value and ``measured:<name>``;
        a missing one stays NaN (imputed with the training mean) with ``measured`` 0. Genes
        set ``gene:SYMBOL`` and ``genetic_testing_done`` says whether testing was done.
        """
        req.check()
        x = np.zeros(len(self.features), dtype=np.float64)
        present, unknown, mapped = self._symptom_columns(req.symptoms)
        absent, unknown_excluded, mapped_excluded = self._excluded_columns(req.excluded_symptoms)
        unknown += unknown_excluded
        mapped.update(mapped_excluded)
        for t in present:
            x[self._index[t]] = 1.0
        for t in absent - present:
            self._set(x, excluded_column(t), 1.0)
        for name in self._markers:
            x[self._index[name]] = np.nan
            self._set(x, measured_column(name), 0.0)
        for name, m in req.biomarkers.items():
            value = self._marker_value(name, m)
            x[self._index[name]] = value
            self._set(x, measured_column(name), 1.0)
        for i, g in enumerate(req.genes):
            sym = g.strip().upper().removeprefix("GENE:")
            if not sym:
                raise ValidationError(f"genes.{i}", "empty gene symbol")
            col = self._genes.get(sym)
            if col is None:
                unknown.append(g)
            else:
                x[self._index[col]] = 1.0
        self._set(x, GENETIC_TESTING_COLUMN, float(req.genetic_testing_done))
        if "age_onset_years" in self._index:
            if req.age is None:
                x[self._index["age_onset_years"]] = np.nan
            elif not (math.isfinite(req.age) and 0.0 <= req.age <= MAX_AGE_YEARS):
                raise ValidationError("age", f"must be between 0 and {MAX_AGE_YEARS:g} years")
            else:
                x[self._index["age_onset_years"]] = req.age
        if "sex_male" in self._index:
            if req.sex not in (None, "F", "M"):
                raise ValidationError("sex", "expected 'F', 'M' or null")
            x[self._index["sex_male"]] = np.nan if req.sex is None else float(req.sex == "M")
        return x, unknown, mapped

    # -- scoring

    def diagnose(self, request: PatientRequest) -> Diagnosis:
        """Rank every class and explain the top three; raises :class:`ValidationError`."""
        x, unknown, mapped = self.encode(request)
        z = self.saved.prepare(x[None, :])[0]
        proba = self.saved.predict_proba(x[None, :])[0]
        order = np.argsort(-proba, kind="stable")
        candidates = []
        for rank, c in enumerate(order, start=1):
            findings = self._explain(x, z, int(c)) if rank <= TOP_CANDIDATES else ()
            candidates.append(
                Candidate(rank, self.saved.classes[int(c)], float(proba[c]), findings)
            )
        imputed = tuple(n for n in self._markers if n not in request.biomarkers)
        return Diagnosis(
            differential=tuple(candidates),
            model_hash=self.saved.model_hash,
            model_round=self.saved.round,
            unknown_terms=tuple(unknown),
            mapped_terms=mapped,
            imputed=imputed,
        )

    def _explain(self, x: np.ndarray, z: np.ndarray, c: int) -> tuple[Finding, ...]:
        contrib = z * self._relative[:, c]
        known = ~np.isnan(x)
        # A finding the patient reported: a present symptom/gene, a measured biomarker, age, sex.
        reported = known & ((x != 0) | np.array([f.kind != "binary" for f in self.features]))
        idx = [int(j) for j in np.argsort(-contrib) if reported[j] and contrib[j] > 0]
        return tuple(self._finding(j, float(x[j]), float(contrib[j])) for j in idx[:TOP_FINDINGS])

    def _finding(self, j: int, raw: float, contribution: float) -> Finding:
        f = self.features[j]
        value: float | bool | str
        flag = ""
        if f.name == "sex_male":
            value = "M" if raw == 1.0 else "F"
        elif f.kind == "binary":
            value = True
        else:
            value = raw
            if f.reference_range is not None:
                lo, hi = f.reference_range
                flag = "low" if raw < lo else "high" if raw > hi else "normal"
        return Finding(f.name, f.label, value, f.unit, round(contribution, 4), flag)
