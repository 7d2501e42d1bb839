"""The ``/diagnose`` request body and the 422 answers the oracle gives.

The pydantic models put in the OpenAPI schema exactly what the engine accepts, so a
schema-valid request is never refused for an unknown marker or unit (schemathesis checks it);
:func:`engine_422` turns the engine's own validation error into the same ``detail`` shape
pydantic's errors have, and :func:`json_safe` makes any echoed input encodable, so a 422
cannot itself fail.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from medimesh.diagnosis import UNIT_CONVERSIONS, Measurement, PatientRequest

__all__ = [
    "BiomarkerIn",
    "Biomarkers",
    "DiagnoseIn",
    "Term",
    "engine_422",
    "json_safe",
    "last_event_id_422",
]

# The pattern puts in the schema what stripping enforces: at least one character that
# pydantic's strip (Unicode White_Space) keeps. Spelled out, because JSON Schema's \S
# (ECMA-262) differs (U+0085 is not whitespace there); schemathesis found the gaps.
_STRIPPED = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
Term = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=64, strip_whitespace=True, pattern=f"[^{_STRIPPED}]"
    ),
]


class BiomarkerIn(BaseModel):
    """One lab value in the unit it was reported in."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(ge=0.0, le=1e9, allow_inf_nan=False, strict=True)
    unit: str = Field(min_length=1, max_length=32)


def _biomarkers_model() -> type[BaseModel]:
    """One optional field per panel biomarker, each with the units it may be reported in.

    The OpenAPI schema then says exactly what the engine accepts, so a schema-valid request
    is never refused for an unknown marker or unit (checked by schemathesis in the tests).
    """
    from medimesh.data.cohort import features

    fields: dict[str, Any] = {}
    for f in features():
        if f.kind != "lognormal":
            continue
        units = (f.unit, *(given for (unit, given) in UNIT_CONVERSIONS if unit == f.unit))
        marker = create_model(
            f"Biomarker_{f.name}",
            __config__=ConfigDict(extra="forbid"),
            __doc__=f"{f.label}, in {' or '.join(units)}",
            value=(float, Field(ge=0.0, le=1e9, allow_inf_nan=False, strict=True)),
            unit=(Literal[units], Field(description=f"canonical unit: {f.unit}")),  # type: ignore[arg-type]
        )
        fields[f.name] = (marker | None, None)
    model: type[BaseModel] = create_model(
        "Biomarkers", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model


Biomarkers = _biomarkers_model()


class DiagnoseIn(BaseModel):
    """A patient in the consortium's vocabulary; every field is optional."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            # Said in the schema, so a schema-valid body is never refused: a gene finding
            # needs a genetic test (the engine's 422 names ``sequenced``).
            "not": {
                "required": ["sequenced", "genes"],
                "properties": {"sequenced": {"const": False}, "genes": {"minItems": 1}},
            },
            "examples": [
                {
                    "symptoms": ["HP:0001744", "HP:0002240"],
                    "excluded_symptoms": ["HP:0001250"],
                    "biomarkers": {"chitotriosidase": {"value": 5200, "unit": "nmol/h/mL"}},
                    "genes": ["GBA1"],
                    "sequenced": True,
                    "age": 12,
                    "sex": "F",
                }
            ]
        },
    )
    symptoms: list[Term] = Field(
        default_factory=list, max_length=256, description="HPO ids OBSERVED in the patient"
    )
    excluded_symptoms: list[Term] = Field(
        default_factory=list,
        max_length=256,
        description="HPO ids checked and found ABSENT; a term in neither list is unknown",
    )
    biomarkers: Biomarkers = Field(  # type: ignore[valid-type]
        default_factory=Biomarkers, description="measured labs; a missing one = not measured"
    )
    genes: list[Term] = Field(
        default_factory=list, max_length=64, description="reported (likely) pathogenic findings"
    )
    sequenced: bool | None = Field(
        default=None,
        strict=True,
        description="genetic testing done? null: true iff genes is non-empty; "
        "true with no genes: tested, nothing found; false with genes: 422",
    )
    # strict: a boolean is not an age (lax mode reads true as 1), as the engine's own check says
    age: float | None = Field(default=None, ge=0.0, le=130.0, allow_inf_nan=False, strict=True)
    sex: Literal["F", "M"] | None = None

    def to_request(self) -> PatientRequest:
        return PatientRequest(
            symptoms=tuple(self.symptoms),
            biomarkers={
                k: Measurement(float(v["value"]), str(v["unit"]))
                for k, v in cast(BaseModel, self.biomarkers).model_dump(exclude_none=True).items()
            },
            genes=tuple(self.genes),
            age=self.age,
            sex=self.sex,
            excluded_symptoms=tuple(self.excluded_symptoms),
            sequenced=self.sequenced,
        )


def json_safe(obj: Any) -> Any:
    """Make an echoed request value encodable: a 422 must never fail while reporting one.

    Non-finite floats become the tokens the client sent ("NaN", "Infinity", "-Infinity");
    strings (and keys) with lone surrogates, which UTF-8 cannot hold, get them as "\\udXXX".
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def engine_422(field: str | None, message: str) -> dict[str, Any]:
    """A 422 body for the engine's refusal of one field (its dotted path) or, ``None``, the
    phenopacket reader's refusal of the whole body, shaped as pydantic's errors are."""
    loc = ["body"] if field is None else ["body", *field.split(".")]
    return {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}


def last_event_id_422() -> dict[str, Any]:
    """The 422 body for a ``Last-Event-ID`` header that is not a sequence number."""
    return {"detail": [{"loc": ["header", "last-event-id"], "msg": "expected a sequence number",
                        "type": "value_error"}]}
