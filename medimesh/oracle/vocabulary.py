"""``/vocabulary``: everything a diagnosis form needs, from the served model's feature spec.

The symptoms, biomarkers, genes and classes are the model's own columns and classes (a model
trained with ``--diseases N`` lists its N diseases and their terms, not the ten-disease
panel's); before any model is served, the default panel's. The worked examples are written
in the panel's vocabulary; a spec that cannot read one leaves it out, and the panel itself
must read them all (a panel change must not ship an example the model cannot read).
Feature vocabulary only, never patient data.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from medimesh.data import cohort
from medimesh.data.cohort import FeatureInfo
from medimesh.diagnosis import UNIT_CONVERSIONS
from medimesh.oracle.requests import BiomarkerIn

__all__ = [
    "BiomarkerOut",
    "ExampleOut",
    "TermOut",
    "VocabularyOut",
    "vocabulary_doc",
]


class TermOut(BaseModel):
    """One HPO symptom term the model knows."""

    id: str
    name: str


class BiomarkerOut(BaseModel):
    """One biomarker: canonical unit, the units /diagnose converts, and a reference range."""

    name: str
    label: str
    unit: str
    units: list[str]
    reference_range: tuple[float, float] | None


class ExampleOut(BaseModel):
    """A worked example patient (illustrative values, not a real patient row)."""

    name: str
    description: str
    resembles: str | None
    symptoms: list[str]
    biomarkers: dict[str, BiomarkerIn]
    genes: list[str]
    age: float | None
    sex: Literal["F", "M"] | None


class VocabularyOut(BaseModel):
    """Everything a diagnosis form needs; feature vocabulary only, never patient data."""

    symptoms: list[TermOut]
    biomarkers: list[BiomarkerOut]
    genes: list[str]
    classes: list[str]
    examples: list[ExampleOut]
    hpo_release: str
    attribution: str


# Worked examples in the model's own vocabulary. Symptoms are either hand-picked (the README's
# Gaucher patient) or the disease's most frequent Orphanet-annotated terms in the panel
# ("typical": how many): in this cohort an unreported symptom counts as absent, so a sparse
# list reads as "not this disease". Lab values are typical literature values, never rows.
_EXAMPLES: tuple[dict[str, Any], ...] = (
    {
        "name": "Gaucher-like: splenomegaly, hepatomegaly, very high chitotriosidase, GBA1",
        "resembles": "Gaucher disease type 1",
        "symptoms": ["HP:0001744", "HP:0002240", "HP:0001873", "HP:0002653"],
        "biomarkers": {"chitotriosidase": (5200.0, "nmol/h/mL"), "lyso_gb1": (150.0, "ng/mL")},
        "genes": ["GBA1"],
        "age": 12.0,
        "sex": "F",
    },
    {
        "name": "Fabry-like: high lyso-Gb3, low α-Gal A, GLA variant",
        "resembles": "Fabry disease",
        "typical": 12,
        "biomarkers": {"lyso_gb3": (28.0, "ng/mL"), "gla_activity": (2.5, "nmol/h/mg protein")},
        "genes": ["GLA"],
        "age": 9.0,
        "sex": "M",
    },
    {
        "name": "Pompe-like: low acid α-glucosidase, raised CK, GAA variant",
        "resembles": "Pompe disease",
        "typical": 12,
        "biomarkers": {"gaa_activity": (1.1, "µmol/L/h"), "ck": (700.0, "U/L")},
        "genes": ["GAA"],
        "age": 0.3,
        "sex": "M",
    },
    {
        "name": "NPC-like: raised oxysterol and lyso-SM-509, NPC1 variant",
        "resembles": "Niemann-Pick disease type C",
        "typical": 12,
        "biomarkers": {"chol_triol": (60.0, "ng/mL"), "lyso_sm509": (4.5, "ng/mL")},
        "genes": ["NPC1"],
        "age": 9.0,
        "sex": "M",
    },
    {
        "name": "Non-specific referral: hepatosplenomegaly and seizures, unremarkable labs",
        "resembles": None,
        "symptoms": ["HP:0001433", "HP:0001250"],
        "biomarkers": {"chitotriosidase": (60.0, "nmol/h/mL"), "chol_triol": (14.0, "ng/mL")},
        "genes": [],
        "age": 4.0,
        "sex": "F",
    },
)


def _example(ex: dict[str, Any], names: set[str], classes: Sequence[str]) -> dict[str, Any]:
    """One example as /vocabulary returns it; refuses features the model does not have."""
    panel = cohort.class_names()
    symptoms = list(ex.get("symptoms", []))
    if "typical" in ex:
        freq = cohort.symptom_probabilities(panel.index(ex["resembles"]))
        symptoms = sorted(freq, key=lambda t: (-freq[t], t))[: ex["typical"]]
        how = f"the {ex['typical']} most frequent annotated features of {ex['resembles']}"
    else:
        how = f"{len(symptoms)} hand-picked symptoms"
    unknown = [t for t in (*symptoms, *ex["biomarkers"]) if t not in names]
    unknown += [g for g in ex["genes"] if f"gene:{g}" not in names]
    if ex["resembles"] not in (None, *classes):
        unknown.append(ex["resembles"])
    if unknown:
        raise ValueError(f"example {ex['name']!r} uses unknown features {unknown}")
    return {
        "name": ex["name"],
        "description": f"Illustrative presentation ({how}); not a patient record.",
        "resembles": ex["resembles"],
        "symptoms": symptoms,
        "biomarkers": {k: {"value": v, "unit": u} for k, (v, u) in ex["biomarkers"].items()},
        "genes": list(ex["genes"]),
        "age": ex["age"],
        "sex": ex["sex"],
    }


def _examples(names: set[str], classes: Sequence[str], strict: bool) -> list[dict[str, Any]]:
    out = []
    for ex in _EXAMPLES:
        try:
            out.append(_example(ex, names, classes))
        except ValueError:
            if strict:
                raise
    return out


def vocabulary_doc(
    features: Sequence[FeatureInfo] | None = None, classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """The /vocabulary answer for a model's feature spec (its columns and class names, in
    order); without one, the default panel's. Built once per spec."""
    if features is None or classes is None:
        return _vocabulary(cohort.features(), cohort.class_names(), strict=True)
    return _vocabulary(tuple(features), tuple(classes), strict=False)


@functools.lru_cache(maxsize=8)
def _vocabulary(
    feats: tuple[FeatureInfo, ...], classes: tuple[str, ...], strict: bool
) -> dict[str, Any]:
    names = {f.name for f in feats}
    markers = [f for f in feats if f.kind == "lognormal"]
    panel = cohort.load_panel()
    return {
        "symptoms": [{"id": f.name, "name": f.label} for f in feats if f.name.startswith("HP:")],
        "biomarkers": [
            {
                "name": f.name,
                "label": f.label.removesuffix(f" ({f.unit})"),
                "unit": f.unit,
                "units": [f.unit, *(g for (u, g) in UNIT_CONVERSIONS if u == f.unit)],
                "reference_range": f.reference_range,
            }
            for f in markers
        ],
        "genes": [f.name[5:] for f in feats if f.name.startswith("gene:")],
        "classes": list(classes),
        "examples": _examples(names, classes, strict),
        "hpo_release": str(panel.get("hpo_release", "")),
        "attribution": str(panel.get("attribution", "")),
    }
