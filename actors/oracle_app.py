"""The oracle's FastAPI app: :func:`build_app` and :func:`configure`, and the diagnosis,
vocabulary and readiness routes (the store-backed ones are in ``oracle_routes``).

Client mistakes are 4xx, never 500: pydantic bounds and engine validation give 422 naming the
field, an oversized body 413, an unknown model 404; a missing model or database is 503. Numbers
are strict and finite (no ``true`` for 1, no NaN/Infinity, which Python's json parser accepts),
and a 422 echoes its input made encodable (medimesh.oracle.requests.json_safe), so it cannot
itself fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from medimesh.access import AccessPolicy
from medimesh.actors.oracle_routes import add_event_route, add_store_routes
from medimesh.actors.oracle_state import OracleState
from medimesh.diagnosis import ValidationError
from medimesh.oracle.config import OracleConfig
from medimesh.oracle.middleware import AccessGuard, BodyLimit
from medimesh.oracle.requests import DiagnoseIn, engine_422, json_safe
from medimesh.oracle.responses import ERR, ready_doc
from medimesh.oracle.vocabulary import VocabularyOut, vocabulary_doc
from medimesh.store import StoreError, StoreUnavailable

__all__ = ["build_app", "configure"]


def build_app(config: OracleConfig | None = None, **kwargs: Any) -> FastAPI:
    """The oracle's FastAPI app. Pass a config (or ``database_url=...``) now, or configure the
    app later with :func:`configure` (how the Serve deployment does it, in its replica)."""
    if config is None and kwargs:
        config = OracleConfig(**kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: OracleState | None = getattr(app.state, "oracle", None)
        if state is not None:
            await state.start()
        try:
            yield
        finally:
            if state is not None:
                await state.stop()

    app = FastAPI(
        title="MediMesh oracle",
        version="1",
        summary="Differential diagnosis from the federation's latest model, plus its audit.",
        lifespan=lifespan,
    )
    if config is not None:
        configure(app, config)

    async def st(request: Request) -> OracleState:
        state: OracleState | None = getattr(request.app.state, "oracle", None)
        if state is None:
            raise HTTPException(503, "oracle not configured")
        await state.start()
        return state

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input as is: NaN or a lone surrogate made it a 500.
        detail = json_safe(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"store unavailable: {exc}"}, status_code=503)

    @app.post(
        "/diagnose",
        summary="Ranked differential for one patient",
        responses={413: ERR, 503: ERR},
    )
    async def diagnose(body: DiagnoseIn, request: Request) -> dict[str, Any]:
        state = await st(request)
        served = state.served  # read the reference once: one model answers the whole request
        if served is None:
            raise HTTPException(503, f"no model loaded yet ({state.last_error or 'starting'})")
        try:
            # model_hash and model_round come from the engine; run_id names the run it is of
            return {**served.engine.diagnose(body.to_request()).to_dict(),
                    "run_id": served.run_id,
                    "vouched_by": None if served.voucher is None else served.voucher.to_dict()}
        except ValidationError as exc:
            return JSONResponse(  # type: ignore[return-value]
                engine_422(exc.field, exc.message), status_code=422
            )

    from medimesh.actors.phenopacket_api import add_phenopacket_route

    add_phenopacket_route(app, st, {413: ERR, 503: ERR})
    add_store_routes(app, st)
    add_event_route(app, st)

    @app.get("/vocabulary", summary="Symptoms, biomarkers, genes, classes and worked examples")
    async def vocabulary(request: Request) -> VocabularyOut:
        # The served model's own spec (a --diseases N model lists its N diseases' terms);
        # before any model, the default panel's. No store needed.
        state: OracleState | None = getattr(request.app.state, "oracle", None)
        served = None if state is None else state.served
        if served is None:
            return VocabularyOut.model_validate(vocabulary_doc())
        engine = served.engine
        return VocabularyOut.model_validate(
            vocabulary_doc(engine.features, engine.saved.classes)
        )

    @app.get("/health", summary="The process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="A model is loaded and the store answers", responses={503: ERR})
    async def ready(request: Request) -> JSONResponse:
        state = await st(request)
        problems: list[str] = []
        served = state.served
        engine = served.engine if served is not None else None
        if engine is None:
            problems.append(f"no model loaded ({state.last_error or 'starting'})")
        if state.store is None:
            problems.append("store not connected")
        else:
            try:
                await state.store.head()
            except StoreError as exc:
                problems.append(f"store not answering: {exc}")
        body, status = ready_doc(
            model_hash=engine.model_hash if engine else None,
            model_round=engine.round if engine else None,
            run_id=state.run_id,
            vouched_by=(
                None if served is None or served.voucher is None else served.voucher.to_dict()
            ),
            refused=state.refused,
            roster=state.roster_source(),
            problems=problems,
        )
        return JSONResponse(body, status_code=status)

    return app


def configure(app: FastAPI, config: OracleConfig) -> None:
    """Attach state to an app and install the body-size limit and, outermost, the access
    guard (token, rate limits, live-feed cap) before it starts serving."""
    app.state.oracle = OracleState(config)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(AccessGuard, policy=config.access or AccessPolicy.local())
