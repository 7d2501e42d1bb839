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
``c`` relative to the average class is split into a baseline (the average training patient)
plus ``(z[j] − z̄[j])·(w[j,c] − mean_c' w[j,c'])`` per input, so inputs left blank get a share
too; the out-of-distribution flag and the next tests are built on the same encoding
(:mod:`medimesh.explain`, docs/explain.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from medimesh import explain
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
    "EvidenceGroup",
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
NEXT_TESTS: Final = 5
SYMPTOM_SHORTLIST: Final = 15  # symptoms scored exactly after the screen
MIN_SHARE: Final = 0.01  # shares below this (odds ×0.99–×1.01) are not listed
LAB_PROBES: Final = explain.LAB_PROBES
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
    """One model input and its exact share of a candidate's log-odds (see medimesh.explain).

    ``contribution`` is the share in logit units against the average training patient;
    ``odds`` says it as a factor (``×2.4``, ``÷3``), ``effect`` in words; ``status`` is how the
    input was given (observed, not mentioned, measured, not measured, …) and ``display`` the
    value as a person writes it (``5,200 nmol/h/mL``, ``not measured``).
    """

    feature: str
    label: str
    value: float | bool | str | None
    unit: str
    contribution: float
    flag: str = ""  # "high" / "low" / "normal" for biomarkers with a reference range
    status: str = ""
    display: str = ""
    odds: str = ""
    effect: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "contribution": self.contribution,
            "flag": self.flag,
            "status": self.status,
            "display": self.display,
            "odds": self.odds,
            "effect": self.effect,
        }


@dataclass(frozen=True, slots=True)
class EvidenceGroup:
    """The summed share of every input with one status (e.g. all symptoms not mentioned)."""

    status: str
    label: str
    count: int
    contribution: float
    odds: str
    effect: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "label": self.label,
            "count": self.count,
            "contribution": self.contribution,
            "odds": self.odds,
            "effect": self.effect,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """One diagnosis in the differential; the evidence is filled for the top candidates.

    ``findings`` (kept for older clients): the patient's reported findings that support it.
    ``evidence_for`` / ``evidence_against``: the inputs that raise / lower its odds most, of
    any status (a symptom not mentioned, a lab not measured, no genetic test).
    ``baseline``: its log-odds for the average training patient, before any of this patient's
    inputs; ``baseline + Σ all shares`` is its log-odds against the average class.
    """

    rank: int
    name: str
    probability: float
    findings: tuple[Finding, ...] = ()
    evidence_for: tuple[Finding, ...] = ()
    evidence_against: tuple[Finding, ...] = ()
    groups: tuple[EvidenceGroup, ...] = ()
    baseline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "name": self.name,
            "probability": self.probability,
            "findings": [f.to_dict() for f in self.findings],
            "evidence_for": [f.to_dict() for f in self.evidence_for],
            "evidence_against": [f.to_dict() for f in self.evidence_against],
            "groups": [g.to_dict() for g in self.groups],
            "baseline": None if self.baseline is None else {
                "contribution": self.baseline,
                "odds": explain.fmt_odds(self.baseline),
                "effect": explain.baseline_words(self.name, self.baseline),
            },
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The oracle's answer: every class ranked, the model that said so, and what was ignored.

    ``out_of_distribution`` says whether (and why) the query is unlike the training data;
    ``next_tests`` the evidence that would most change the ranking (medimesh.explain).
    """

    differential: tuple[Candidate, ...]
    model_hash: str
    model_round: int
    unknown_terms: tuple[str, ...]
    mapped_terms: Mapping[str, tuple[str, ...]]
    imputed: tuple[str, ...]
    disclaimer: str = DISCLAIMER
    out_of_distribution: explain.OutOfDistribution = field(
        default_factory=explain.OutOfDistribution
    )
    next_tests: tuple[explain.NextTest, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "differential": [c.to_dict() for c in self.differential],
            "model_hash": self.model_hash,
            "model_round": self.model_round,
            "unknown_terms": list(self.unknown_terms),
            "mapped_terms": {k: list(v) for k, v in self.mapped_terms.items()},
            "imputed": list(self.imputed),
            "disclaimer": self.disclaimer,
            "out_of_distribution": self.out_of_distribution.to_dict(),
            "next_tests": [t.to_dict() for t in self.next_tests],
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
        profile: explain.TrainingProfile | None = None,
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
        self.profile = profile or explain.TrainingProfile()
        self._z_ref = explain.reference_inputs(saved.mean, saved.scale_mask)
        self._symptom_mask = explain.symptom_mask(names)
        self._below = self._descendants()
        # One explanation row ("item") per thing a clinician enters: a symptom is its observed
        # and its excluded column, a lab its value and its measured indicator.
        self._items = explain.items_of(names)
        self._item_of_column = np.zeros(len(names), dtype=np.int64)
        for i, (_, cols) in enumerate(self._items):
            self._item_of_column[cols] = i
        self._scaled = [
            (j, f.name, f.label.removesuffix(f" ({f.unit})"), f.unit)
            for j, f in enumerate(features) if saved.scale_mask[j]
        ]
        self._item_primary = np.array([p for p, _ in self._items], dtype=np.int64)
        # Each symptom column's ``excluded:`` partner (-1: none, an older layout).
        self._excluded_of = np.array(
            [self._index.get(excluded_column(n), -1) for n in names], dtype=np.int64
        )
        self._item_partner = np.array(
            [next((j for j in cols if j != p), -1) for p, cols in self._items], dtype=np.int64
        )
        self._item_kind = np.array([self._kind(names[p]) for p, _ in self._items], dtype=object)
        # 0/1 indicator inputs (excluded / measured / genetic testing) and their words.
        self._indicators = [
            (j, f.name, (off, on))
            for j, f in enumerate(features)
            if not saved.scale_mask[j]
            and (off := explain.indicator_words(f.name, self._owner_label(f.name), 0.0))
            and (on := explain.indicator_words(f.name, self._owner_label(f.name), 1.0))
        ]
        self._indicator_idx = np.array([j for j, _, _ in self._indicators], dtype=np.int64)

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
            j = self._index["sex_male"]
            # Not given is not female: a 0/1 column left NaN would be read as 0, so an unknown
            # sex takes the training share of males (as a lab not measured takes its mean).
            x[j] = float(self.saved.mean[j]) if req.sex is None else float(req.sex == "M")
        return x, unknown, mapped

    # -- scoring

    def diagnose(self, request: PatientRequest) -> Diagnosis:
        """Rank every class, explain the top three, flag an unusual query, suggest tests.

        Raises :class:`ValidationError`.
        """
        x, unknown, mapped = self.encode(request)
        z = self.saved.prepare(x[None, :])[0]
        proba = self.saved.predict_proba(x[None, :])[0]
        order = np.argsort(-proba, kind="stable")
        status = self._statuses(request, x)
        candidates = []
        for rank, c in enumerate(order, start=1):
            name = self.saved.classes[int(c)]
            if rank <= TOP_CANDIDATES:
                candidates.append(self._explain(x, z, int(c), rank, float(proba[c]), status))
            else:
                candidates.append(Candidate(rank, name, float(proba[c])))
        imputed = tuple(n for n in self._markers if n not in request.biomarkers)
        return Diagnosis(
            differential=tuple(candidates),
            model_hash=self.saved.model_hash,
            model_round=self.saved.round,
            unknown_terms=tuple(unknown),
            mapped_terms=mapped,
            imputed=imputed,
            out_of_distribution=self._ood(request, x, z, unknown),
            next_tests=explain.rank_tests(
                self._probes(request, x), proba, self.saved.classes, top=NEXT_TESTS
            ),
        )

    # -- explanation

    def _statuses(self, request: PatientRequest, x: np.ndarray) -> list[explain.Status]:
        """How each item was given, in the request's terms (drives the words shown)."""
        prim = self._item_primary
        v = x[prim]
        given = ~np.isnan(v)
        on = np.nan_to_num(v) > 0
        partner = np.where(self._item_partner >= 0, x[np.maximum(self._item_partner, 0)], 0.0)
        kind = self._item_kind
        tested = request.genetic_testing_done
        status = np.full(len(prim), "encoding", dtype=object)
        sym = kind == "symptom"
        status[sym] = np.where(on[sym], "observed", np.where(
            np.nan_to_num(partner[sym]) > 0, "excluded", "not_mentioned"))
        lab = kind == "marker"
        status[lab] = np.where(given[lab], "measured", "not_measured")
        gene = kind == "gene"
        status[gene] = np.where(on[gene], "variant",
                                "no_variant" if tested else "not_sequenced")
        gtd = kind == "testing"
        status[gtd] = np.where(on[gtd], "sequenced", "not_sequenced")
        demo = kind == "demographic"
        status[demo] = np.where(given[demo], "given", "unknown")
        return list(status)

    def _explain(
        self, x: np.ndarray, z: np.ndarray, c: int, rank: int, p: float,
        status: Sequence[explain.Status],
    ) -> Candidate:
        w, b = self.saved.model.weights, self.saved.model.bias
        baseline, column_shares = explain.candidate_shares(z, self._z_ref, w, b, c)
        shares = np.bincount(self._item_of_column, weights=column_shares,
                             minlength=len(self._items))
        name = self.saved.classes[c]
        st = np.asarray(status, dtype=object)
        # Reported findings that support it (the answer's original ``findings`` list).
        entered = np.isin(st, ("observed", "measured", "variant", "given"))
        order = np.argsort(-shares, kind="stable")
        reported = [int(i) for i in order if entered[i] and shares[i] > 0][:TOP_FINDINGS]
        pro = [int(i) for i in order[:TOP_FINDINGS] if shares[i] >= MIN_SHARE]
        con = [int(i) for i in order[::-1][:TOP_FINDINGS] if shares[i] <= -MIN_SHARE]
        # What the clinician entered is always listed (even when it barely counts: that is
        # worth knowing too); what was left out only when it moves the odds.
        summary = []
        for kind in dict.fromkeys(status):
            idx = np.flatnonzero(st == kind)
            total = float(shares[idx].sum())
            if kind in ENTERED or abs(total) >= MIN_SHARE:
                summary.append(explain_group(name, kind, idx.tolist(), total))

        def finding(i: int) -> Finding:
            j = self._items[i][0]
            return self._finding(j, float(x[j]), float(shares[i]), status[i], name)

        return Candidate(
            rank, name, p,
            findings=tuple(finding(i) for i in reported),
            evidence_for=tuple(finding(i) for i in pro),
            evidence_against=tuple(finding(i) for i in con),
            groups=tuple(sorted(summary, key=lambda g: -abs(g.contribution))),
            baseline=round(baseline, 4),
        )

    def _finding(
        self, j: int, raw: float, contribution: float, status: explain.Status = "observed",
        candidate: str = "",
    ) -> Finding:
        f = self.features[j]
        value: float | bool | str | None
        flag = ""
        label = f.label.removesuffix(f" ({f.unit})") if f.unit else f.label
        if status in ("not_mentioned", "not_measured", "not_sequenced", "unknown", "excluded",
                      "sequenced"):
            value = None if status != "excluded" else False
            display = STATUS_WORDS[status]
        elif f.name == "sex_male":
            value = "M" if raw == 1.0 else "F"
            display = "male" if raw == 1.0 else "female"
        elif f.kind == "binary":
            value = bool(raw > 0)
            display = STATUS_WORDS[status]
        else:
            value = raw
            display = f"{explain.fmt_number(raw)} {f.unit}".strip()
            if f.reference_range is not None:
                lo, hi = f.reference_range
                flag = "low" if raw < lo else "high" if raw > hi else "normal"
                display += f" ({flag})"
        return Finding(
            f.name, label, value, f.unit, round(contribution, 4), flag, status, display,
            explain.fmt_odds(contribution), explain.effect_words(candidate, contribution),
        )

    # -- out of distribution

    def _ood(
        self, request: PatientRequest, x: np.ndarray, z: np.ndarray, unknown: Sequence[str]
    ) -> explain.OutOfDistribution:
        extreme = [
            (name, label, float(z[j]), float(x[j]), unit)
            for j, name, label, unit in self._scaled
            if not np.isnan(x[j])
        ]
        n_found = int(explain.count_findings(x, self._symptom_mask)[0])
        rare: list[tuple[str, str, float]] = []
        if self._indicators:
            idx = self._indicator_idx
            v = x[idx]
            p_one = self.saved.mean[idx]  # training share of rows with a 1 in each
            share = np.where(np.nan_to_num(v) > 0, p_one, 1.0 - p_one)
            for k in np.flatnonzero(~np.isnan(v) & (share < explain.OOD_MIN_SHARE)):
                _, name, (off, on) = self._indicators[k]
                rare.append((name, on if v[k] > 0 else off, float(share[k])))
        return explain.check_ood(
            n_findings=n_found,
            profile=self.profile,
            extreme=extreme,
            n_unknown=len(unknown),
            n_terms=len(request.symptoms) + len(request.excluded_symptoms) + len(request.genes),
            rare=rare,
        )

    def _owner_label(self, name: str) -> str:
        """The label of the column an indicator belongs to (``excluded:HP:…`` → its term)."""
        for prefix in ("excluded:", "measured:"):
            if name.startswith(prefix):
                j = self._index.get(name.removeprefix(prefix))
                if j is not None:
                    f = self.features[j]
                    return f.label.removesuffix(f" ({f.unit})") if f.unit else f.label
        return name

    # -- next tests

    def _symptom_shortlist(self, x: np.ndarray) -> list[int]:
        """Symptoms not mentioned, screened to the few whose answer could matter most.

        The screen moves one column in model space (``p' ∝ p·exp(Δz·w[j])``): the term's own
        column for "present", its ``excluded:`` column for "absent", which is how the encoding
        reads a newly answered panel term (ignoring ontology neighbours); the shortlist is then
        scored exactly through :meth:`encode`. It keeps ``SYMPTOM_SHORTLIST`` terms.
        """
        xz = np.nan_to_num(x)
        excl = self._excluded_of
        free = self._symptom_mask & (xz == 0)
        free &= np.where(excl >= 0, xz[np.maximum(excl, 0)] == 0, True)
        pairs = [(int(j), None if excl[j] < 0 else int(excl[j])) for j in np.flatnonzero(free)]
        if not pairs:
            return []
        z = self.saved.prepare(x[None, :])[0]
        w = np.asarray(self.saved.model.weights, dtype=np.float64)
        logits = z @ w + np.asarray(self.saved.model.bias, dtype=np.float64)
        p0 = explain.softmax(logits[None, :])[0]
        a, b = np.argsort(-p0, kind="stable")[:2]

        def swings(cols: np.ndarray) -> np.ndarray:
            dz = np.where(self.saved.scale_mask[cols], 1.0 / self.saved.std[cols], 1.0)
            p1 = explain.softmax(logits[None, :] + dz[:, None] * w[cols])
            return np.asarray(np.abs((p1[:, a] - p1[:, b]) - (p0[a] - p0[b])))

        present = swings(np.array([j for j, _ in pairs]))
        have = np.array([e is not None for _, e in pairs])
        absent = np.zeros(len(pairs))
        if have.any():
            absent[have] = swings(np.array([e for _, e in pairs if e is not None]))
        keep = np.argsort(-np.maximum(present, absent), kind="stable")[:SYMPTOM_SHORTLIST]
        return [int(pairs[i][0]) for i in keep]

    def _kind(self, name: str) -> str:
        if name.startswith("HP:"):
            return "symptom"
        if name in self._markers:
            return "marker"
        if name.startswith("gene:"):
            return "gene"
        if name == GENETIC_TESTING_COLUMN:
            return "testing"
        if name in ("age_onset_years", "sex_male"):
            return "demographic"
        return "other"

    def _with_symptom(self, x: np.ndarray, term: str) -> np.ndarray:
        """``x`` as :meth:`encode` would give it with ``term`` also observed."""
        row = x.copy()
        for c in self._symptom_columns((term,))[0]:
            row[self._index[c]] = 1.0
            self._set(row, excluded_column(c), 0.0)  # observed outweighs excluded
        return row

    def _without_symptom(self, x: np.ndarray, term: str) -> np.ndarray:
        """``x`` as :meth:`encode` would give it with ``term`` also marked absent."""
        row = x.copy()
        for c in self._excluded_columns((term,))[0]:
            if row[self._index[c]] != 1.0:
                self._set(row, excluded_column(c), 1.0)
        return row

    def _probes(self, request: PatientRequest, x: np.ndarray) -> list[explain.Probe]:
        """Every test not yet done, each answer set as :meth:`encode` would set it.

        Rows are edited from ``x`` with the encoder's own helpers rather than re-encoded from
        a modified request (a hundred encodes per answer cost ~15 ms); a test checks that
        every answer's probabilities equal those of the re-encoded request.
        """
        specs: list[tuple[str, str, str, str, list[str], list[np.ndarray], list[float | None]]]
        specs = []
        for j in self._symptom_shortlist(x):
            f = self.features[j]
            present, absent = self._with_symptom(x, f.name), self._without_symptom(x, f.name)
            specs.append(("symptom", f.name, f.label, f"Ask about or look for: {f.label}",
                          ["if present", "if absent"], [present, absent], [None, None]))
        mean, std = self.saved.mean, self.saved.std
        for name, f in self._markers.items():
            if name in request.biomarkers:
                continue
            j = self._index[name]
            answers: list[str] = []
            rows: list[np.ndarray] = []
            values: list[float | None] = []
            for k, words in LAB_PROBES:
                v = float(np.exp(mean[j] + k * std[j]))
                where = "training mean" if k == 0 else f"training mean {'+' if k > 0 else '−'} " \
                    f"{abs(k):g} SD"
                answers.append(f"if {words} (≈ {explain.fmt_number(v)} {f.unit}, {where})")
                row = x.copy()
                row[j] = v
                self._set(row, measured_column(name), 1.0)
                rows.append(row)
                values.append(v)
            label = f.label.removesuffix(f" ({f.unit})")
            specs.append(("biomarker", name, label, f"Measure {label} ({f.unit})", answers,
                          rows, values))
        if not request.genetic_testing_done and self._genes:
            answers, rows = [], []
            tested = x.copy()
            self._set(tested, GENETIC_TESTING_COLUMN, 1.0)
            for sym in sorted(self._genes):
                answers.append(f"if a pathogenic {sym} variant is found")
                row = tested.copy()
                row[self._index[self._genes[sym]]] = 1.0
                rows.append(row)
            answers.append("if nothing is found")
            rows.append(tested)
            nothing: list[float | None] = [None] * len(rows)
            panel = ", ".join(sorted(self._genes))
            specs.append(("genetic_test", "genes", "Genetic testing",
                          f"Genetic testing (panel of {len(self._genes)} genes: {panel})",
                          answers, rows, nothing))
        if not specs:
            return []
        proba = self.saved.predict_proba(np.vstack([r for s in specs for r in s[5]]))
        probes, at = [], 0
        for kind, feature, label, question, answers, rows, values in specs:
            probes.append(explain.Probe(
                kind, feature, label, question, tuple(answers),  # type: ignore[arg-type]
                proba[at:at + len(rows)], tuple(values),
            ))
            at += len(rows)
        return probes


ENTERED: Final = frozenset(
    {"observed", "excluded", "measured", "variant", "no_variant", "sequenced", "given"}
)

STATUS_WORDS: Final[Mapping[str, str]] = {
    "observed": "observed",
    "excluded": "absent (excluded)",
    "not_mentioned": "not mentioned",
    "measured": "measured",
    "not_measured": "not measured",
    "variant": "pathogenic variant reported",
    "no_variant": "tested, no variant",
    "not_sequenced": "no genetic test",
    "sequenced": "genetic testing done",
    "given": "given",
    "unknown": "not given",
    "encoding": "model input",
}

GROUP_WORDS: Final[Mapping[str, str]] = {
    "observed": "observed symptoms",
    "excluded": "symptoms marked absent",
    "not_mentioned": "symptoms not mentioned",
    "measured": "measured labs",
    "not_measured": "labs not measured",
    "variant": "reported gene variants",
    "no_variant": "genes tested without a finding",
    "not_sequenced": "no genetic testing",
    "sequenced": "genetic testing done",
    "given": "age and sex",
    "unknown": "age or sex not given",
    "encoding": "other model inputs",
}


def explain_group(candidate: str, status: str, idx: Sequence[int], share: float) -> EvidenceGroup:
    """All inputs with one status, summed: how much the silence (or the labs) weigh."""
    return EvidenceGroup(
        status, GROUP_WORDS.get(status, status), len(idx), round(share, 4),
        explain.fmt_odds(share), explain.effect_words(candidate, share),
    )
