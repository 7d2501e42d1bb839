"""``POST /diagnose/phenopacket``: the oracle's GA4GH Phenopackets v2 query format.

The body's models live in :mod:`medimesh.oracle.phenopacket_request` (why the body is a
phenopacket of its own path, and which fields are read, is said there); this module registers
the route. The validated fields are parsed into ``phenopackets.Phenopacket`` with the library
and read by :func:`medimesh.phenopackets.convert`, the same reader the phenopacket sites train
with. Files on disk (``train``, ``evaluate``) are parsed strictly, whole.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from medimesh.oracle.phenopacket_request import (
    AgeIn,
    AgeRangeIn,
    DiagnosisIn,
    DiseaseIn,
    GeneDescriptorIn,
    GenomicInterpretationIn,
    IndividualIn,
    InterpretationIn,
    MeasurementIn,
    OntologyClassIn,
    PhenopacketIn,
    PhenotypicFeatureIn,
    QuantityIn,
    TimeElementIn,
    ValueIn,
    VariantInterpretationIn,
    VariationDescriptorIn,
)
from medimesh.oracle.requests import engine_422

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
    "add_phenopacket_route",
]


def add_phenopacket_route(
    app: FastAPI, state_of: Callable[[Request], Awaitable[Any]], errors: dict[int | str, Any]
) -> None:
    """Register ``POST /diagnose/phenopacket`` on the oracle app."""
    from medimesh.diagnosis import ValidationError
    from medimesh.phenopackets import PhenopacketError, convert, parse_phenopacket

    @app.post(
        "/diagnose/phenopacket",
        summary="Ranked differential for one GA4GH Phenopacket v2 (docs/phenopackets.md)",
        responses=errors,
    )
    async def diagnose_phenopacket(body: PhenopacketIn, request: Request) -> dict[str, Any]:
        state = await state_of(request)
        engine = state.engine  # one model answers the whole request
        if engine is None:
            raise HTTPException(503, f"no model loaded yet ({state.last_error or 'starting'})")
        try:
            converted = convert(parse_phenopacket(body.to_json()), state.phenopacket_codes)
            answer: dict[str, Any] = engine.diagnose(converted.request).to_dict()
        except PhenopacketError as exc:
            return JSONResponse(engine_422(None, exc.message), 422)  # type: ignore[return-value]
        except ValidationError as exc:
            return JSONResponse(  # type: ignore[return-value]
                engine_422(exc.field, exc.message), 422
            )
        answer["phenopacket"] = {
            "id": converted.id,
            "unmapped_measurements": converted.unmapped_measurements,
            "onset_from": converted.onset_source or None,
        }
        return answer
