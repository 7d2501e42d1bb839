"""The oracle's store-backed routes: ``/network``, ``/audit``, ``/audit/verify``, ``/rounds``,
``/runs``, ``/baselines``, ``/models``, ``/models/{model_hash}`` and the ``/events`` feed.

Thin: each route reads the store (or the router) and returns what medimesh.oracle.responses
shapes. Registered by :func:`medimesh.actors.oracle_app.build_app`, in the order the OpenAPI
document lists them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from medimesh.actors.oracle_state import OracleState
from medimesh.oracle.requests import last_event_id_422
from medimesh.oracle.responses import (
    ERR,
    audit_page,
    baselines_doc,
    model_dict,
    network_from_nodes,
    network_from_router,
    round_dict,
    round_metrics_of,
    run_dict,
    run_setup,
)
from medimesh.oracle.streams import audit_stream, resume_after
from medimesh.runs import RUN_ID_PATTERN

__all__ = ["add_event_route", "add_store_routes"]

StateOf = Callable[[Request], Awaitable[OracleState]]
RunQuery = Annotated[str | None, Query(pattern=RUN_ID_PATTERN)]


def add_store_routes(app: FastAPI, st: StateOf) -> None:
    """Register /network, /audit, /audit/verify, /rounds, /runs, /baselines and /models."""

    @app.get(
        "/network", summary="Nodes and message counts, AXL-topology-shaped", responses={503: ERR}
    )
    async def network(request: Request) -> dict[str, Any]:
        state = await st(request)
        router_error = None
        try:
            router = await state.router()
        except Exception as exc:  # router gone: fall back to enrolment, say why
            router, router_error = None, f"{type(exc).__name__}: {exc}"
        if router is not None:
            try:
                stats, topo = await asyncio.gather(router.stats.remote(), router.topology.remote())
                return network_from_router(stats, topo)
            except Exception as exc:
                router_error = f"{type(exc).__name__}: {exc}"
        out = network_from_nodes(await (await state.require_store()).nodes())
        if router_error:
            out["router_error"] = router_error
        return out

    @app.get("/audit", summary="Audit entries, keyset-paged by seq", responses={503: ERR})
    async def audit(
        request: Request,
        after_seq: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        # Event names are identifiers ("model_published"); anything else (a NUL byte, which
        # PostgreSQL text cannot hold) is a 422, not a database error.
        event: Annotated[
            str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
        ] = None,
        round: Annotated[int | None, Query(ge=-(2**31), lt=2**31)] = None,
    ) -> dict[str, Any]:
        store = await (await st(request)).require_store()
        rows = await store.entries(after_seq=after_seq, limit=limit + 1, event=event, round=round)
        return audit_page(rows, after_seq, limit)

    @app.get(
        "/audit/verify", summary="Recompute the hash chain and signatures", responses={503: ERR}
    )
    async def audit_verify(request: Request) -> dict[str, Any]:
        # Cached (medimesh.access.VerifyCache): computed_at / computed_for_head / cached say
        # which computation answered.
        state = await st(request)
        return await state.verified(await state.require_store())

    @app.get(
        "/rounds",
        summary="One run's closed rounds and their metrics (default: the served run)",
        responses={404: ERR, 503: ERR},
    )
    async def rounds(request: Request, run: RunQuery = None) -> list[dict[str, Any]]:
        state = await st(request)
        store = await state.require_store()
        record = await state.run_for(store, run)
        if record is None:
            return []
        return [round_dict(r) for r in await store.rounds(record.run_id)]

    @app.get("/runs", summary="Every training run in the store, newest first",
             responses={503: ERR})
    async def runs(request: Request) -> list[dict[str, Any]]:
        state = await st(request)
        served = state.run_id
        return [run_dict(r, served) for r in await (await state.require_store()).runs()]

    @app.get(
        "/baselines",
        summary="Each hospital's isolated model: on its own test split and on all sites'",
        responses={404: ERR, 503: ERR},
    )
    async def baselines(request: Request, run: RunQuery = None) -> dict[str, Any]:
        state = await st(request)
        store = await state.require_store()
        record = await state.run_for(store, run)
        if record is None:
            return baselines_doc(None, {})
        setup = run_setup(await store.entries(event="setup_completed"), record.run_id)
        return baselines_doc(record.run_id, setup)

    @app.get(
        "/models",
        summary="Every stored global model, or one run's (metadata)",
        responses={404: ERR, 503: ERR},
    )
    async def models(request: Request, run: RunQuery = None) -> list[dict[str, Any]]:
        state = await st(request)
        store = await state.require_store()
        if run is not None:
            await state.run_for(store, run)  # 404 for an unknown run
        active = state.engine.model_hash if state.engine is not None else None
        return [model_dict(m, active) for m in await store.models(run)]

    @app.get(
        "/models/{model_hash}",
        summary="One model's metadata and provenance",
        responses={404: ERR, 503: ERR},
    )
    async def model(
        request: Request,
        model_hash: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
    ) -> dict[str, Any]:
        state = await st(request)
        store = await state.require_store()
        m = await store.get_model(model_hash)
        if m is None:
            raise HTTPException(404, f"no model {model_hash}")
        active = state.engine.model_hash if state.engine is not None else None
        out = model_dict(m, active)
        # every run's rounds; the served run's round first if both have it
        out["round_metrics"] = round_metrics_of(await store.rounds(), model_hash, state.run_id)
        return out


def add_event_route(app: FastAPI, st: StateOf) -> None:
    """Register ``GET /events``, the live audit feed (medimesh.oracle.streams)."""

    @app.get(
        "/events",
        summary="Live audit feed (Server-Sent Events, resumable with Last-Event-ID)",
        response_class=StreamingResponse,
    )
    async def events(
        request: Request,
        last_event_id: Annotated[str | None, Header()] = None,
        after_seq: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        max_events: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    ) -> StreamingResponse:
        state = await st(request)
        store = await state.require_store()
        start = resume_after(last_event_id, after_seq)
        if start is None:
            return JSONResponse(last_event_id_422(), status_code=422)  # type: ignore[return-value]

        async def fetch(after: int, limit: int) -> Any:
            return await store.entries(after_seq=after, limit=limit)

        return StreamingResponse(
            audit_stream(fetch, state.changed, request.is_disconnected, start, max_events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
