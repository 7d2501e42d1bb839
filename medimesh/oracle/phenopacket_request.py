"""The ``POST /diagnose/phenopacket`` body: the GA4GH Phenopacket v2 fields MediMesh reads.

Why a path of its own rather than a field of ``/diagnose``: ``/diagnose``'s body is strict
(every unknown key is a 422, and its schema says exactly what is accepted), while a real
phenopacket carries much MediMesh does not read (``metaData``, biosamples, evidence, …). Here
the body IS the phenopacket (protobuf JSON form, camelCase or snake_case names): the fields
MediMesh reads are typed exactly as the Phenopacket schema types them, so a schema-valid body is
never refused, and everything else is ignored, never guessed at. :meth:`PhenopacketIn.to_json`
gives the validated fields back in protobuf JSON form, for
:func:`medimesh.phenopackets.parse_phenopacket` and :func:`medimesh.phenopackets.convert` (the
same reader the phenopacket sites train with).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "AgeIn",
    "AgeRangeIn",
    "DiagnosisIn",
    "DiseaseIn",
    "GeneDescriptorIn",
    "GenomicInterpretationIn",
    "IndividualIn",
    "InterpretationIn",
    "MeasurementIn",
    "OntologyClassIn",
    "PhenopacketIn",
    "PhenotypicFeatureIn",
    "QuantityIn",
    "TimeElementIn",
    "ValueIn",
    "VariantInterpretationIn",
    "VariationDescriptorIn",
]

_CONFIG = ConfigDict(
    extra="ignore", strict=True, alias_generator=to_camel, validate_by_name=True,
    validate_by_alias=True,
)
Text = Field(default="", max_length=256)


class _In(BaseModel):
    model_config = _CONFIG


class OntologyClassIn(_In):
    """An ontology term: ``id`` (CURIE such as HP:0001250) and its ``label``."""

    id: str = Field(default="", max_length=128)
    label: str = Text


class AgeIn(_In):
    """An age as an ISO 8601 duration (``P3Y6M``)."""

    # protobuf's JSON name is all lower case (not "iso8601Duration")
    iso8601duration: str = Field(default="", max_length=64, alias="iso8601duration")


class AgeRangeIn(_In):
    start: AgeIn | None = None
    end: AgeIn | None = None


class TimeElementIn(_In):
    """When something began: an age, an age range or an HPO onset class (first given wins)."""

    age: AgeIn | None = None
    age_range: AgeRangeIn | None = None
    ontology_class: OntologyClassIn | None = None


class IndividualIn(_In):
    id: str = Text
    sex: Literal["UNKNOWN_SEX", "FEMALE", "MALE", "OTHER_SEX"] | None = None


class PhenotypicFeatureIn(_In):
    """An HPO term observed in the patient, or explicitly absent with ``excluded: true``."""

    type: OntologyClassIn | None = None
    excluded: bool = False
    onset: TimeElementIn | None = None


class DiseaseIn(_In):
    term: OntologyClassIn | None = None
    excluded: bool = False
    onset: TimeElementIn | None = None


class GeneDescriptorIn(_In):
    value_id: str = Text
    symbol: str = Field(default="", max_length=64)


class VariationDescriptorIn(_In):
    id: str = Text
    gene_context: GeneDescriptorIn | None = None


class VariantInterpretationIn(_In):
    acmg_pathogenicity_classification: Literal[
        "NOT_PROVIDED", "BENIGN", "LIKELY_BENIGN", "UNCERTAIN_SIGNIFICANCE", "LIKELY_PATHOGENIC",
        "PATHOGENIC",
    ] | None = None
    variation_descriptor: VariationDescriptorIn | None = None


class GenomicInterpretationIn(_In):
    """A gene or variant call; a gene counts when (likely) pathogenic or causative."""

    subject_or_biosample_id: str = Text
    interpretation_status: Literal[
        "UNKNOWN_STATUS", "REJECTED", "CANDIDATE", "CONTRIBUTORY", "CAUSATIVE"
    ] | None = None
    gene: GeneDescriptorIn | None = None
    variant_interpretation: VariantInterpretationIn | None = None


class DiagnosisIn(_In):
    disease: OntologyClassIn | None = None
    genomic_interpretations: list[GenomicInterpretationIn] = Field(
        default_factory=list, max_length=64
    )


class InterpretationIn(_In):
    id: str = Text
    progress_status: Literal[
        "UNKNOWN_PROGRESS", "IN_PROGRESS", "COMPLETED", "SOLVED", "UNSOLVED"
    ] | None = None
    diagnosis: DiagnosisIn | None = None


class QuantityIn(_In):
    unit: OntologyClassIn | None = None
    value: float = Field(default=0.0, ge=-1e12, le=1e12, allow_inf_nan=False)


class ValueIn(_In):
    quantity: QuantityIn | None = None
    ontology_class: OntologyClassIn | None = None


class MeasurementIn(_In):
    """A lab value; read only if the oracle's mapping names its assay (docs/phenopackets.md)."""

    assay: OntologyClassIn | None = None
    value: ValueIn | None = None


class PhenopacketIn(_In):
    """The Phenopacket fields MediMesh reads; any other field is accepted and ignored."""

    model_config = ConfigDict(
        **_CONFIG,
        json_schema_extra={
            "examples": [{
                "id": "example-1",
                "subject": {"id": "patient-1", "sex": "MALE"},
                "phenotypicFeatures": [
                    {"type": {"id": "HP:0001014", "label": "Angiokeratoma"}},
                    {"type": {"id": "HP:0000093", "label": "Proteinuria"}, "excluded": True},
                ],
                "diseases": [],
                "metaData": {"created": "2026-01-01T00:00:00Z", "createdBy": "clinic",
                             "phenopacketSchemaVersion": "2.0"},
            }],
            "externalDocs": {"url": "https://phenopacket-schema.readthedocs.io"},
        },
    )
    id: str = Text
    subject: IndividualIn | None = None
    phenotypic_features: list[PhenotypicFeatureIn] = Field(default_factory=list, max_length=256)
    diseases: list[DiseaseIn] = Field(default_factory=list, max_length=32)
    interpretations: list[InterpretationIn] = Field(default_factory=list, max_length=16)
    measurements: list[MeasurementIn] = Field(default_factory=list, max_length=64)

    def to_json(self) -> dict[str, Any]:
        """The read fields in protobuf JSON form; of several oneof members, the first wins."""
        doc: dict[str, Any] = _oneofs(self.model_dump(by_alias=True, exclude_none=True))
        return doc


# Protobuf oneof groups (JSON names) in priority order: at most one member may be set.
_ONEOFS = (("age", "ageRange", "ontologyClass"), ("gene", "variantInterpretation"),
           ("quantity", "ontologyClass"))


def _oneofs(doc: Any) -> Any:
    if isinstance(doc, list):
        return [_oneofs(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out = {k: _oneofs(v) for k, v in doc.items()}
    for group in _ONEOFS:
        present = [k for k in group if k in out]
        for k in present[1:]:
            del out[k]
    return out
