"""The oracle: a Ray Serve deployment with a FastAPI ingress over the diagnosis engine.

Why this shape: the API is a plain FastAPI app built by :func:`build_app`, so it is testable
with httpx's ASGI transport and no Ray; :func:`oracle_deployment` wraps that same app with
``@serve.ingress`` for production, and :func:`deploy` starts it on Serve. Endpoints are
``async def`` (a thread hop costs Serve 3-4 ms per request) and the engine runs inline: one
prediction is ~0.2 ms.

Hot swap: a background task reacts to the store's NOTIFY (and polls every ``poll_interval``
seconds as a fallback), builds a new immutable :class:`DiagnosisEngine` for the latest model
and replaces ``OracleState.served`` (engine + run id) in one assignment. A request reads that
reference once, so it is answered entirely by one model, and no request waits for or fails
during a swap.

Only a vouched-for model is served (medimesh.release): its weights and the checkpoint's
mean/std must hash to the release hash a ``model_published`` audit entry signs, signed by a
coordinator on the signed roster(s) the oracle holds (``roster_path``; without one, the store's
enrolled nodes, which its owner can edit: ``/ready`` says ``"roster": "store"``). A newer model
without one is refused: the previous vouched model keeps answering (or
503 before any), ``/ready`` says why under ``refused``, and ``/ready`` and every diagnosis name
the vouching entry (``vouched_by``: seq and entry hash).

Runs (medimesh.runs): an oracle serves one run, the one it was started for (``run_id``, as the
demo does), or, started without one, the newest run that has a model. ``/ready``, ``/diagnose``
and ``/rounds`` say which; ``/runs`` lists them; ``?run=`` picks another run's rounds.

Client mistakes are 4xx, never 500: pydantic bounds and engine validation give 422 naming the
field, an oversized body 413, an unknown model 404; a missing model or database is 503. Numbers
are strict and finite (no ``true`` for 1, no NaN/Infinity, which Python's json parser accepts),
and a 422 echoes its input made encodable (:func:`_json_safe`), so it cannot itself fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from medimesh.access import (
    EXEMPT_PATHS,
    AccessPolicy,
    RateLimiter,
    StreamSlots,
    VerifyCache,
    bearer_token,
    is_loopback,
    limit_group,
    token_matches,
)
from medimesh.audit import AuditEntry
from medimesh.audit_cli import check_trail, read_signed_rosters
from medimesh.data import cohort
from medimesh.diagnosis import (
    UNIT_CONVERSIONS,
    DiagnosisEngine,
    Measurement,
    PatientRequest,
    ValidationError,
    saved_model_for,
)
from medimesh.errors import MediMeshError
from medimesh.explain import TrainingProfile
from medimesh.identity import Member
from medimesh.model import model_hash as hash_model
from medimesh.release import UnvouchedModel, Voucher, find_voucher, roster_keys, spec_digest
from medimesh.runs import RUN_ID_PATTERN, UNNAMED_RUN
from medimesh.store import (
    RunRecord,
    Store,
    StoredModel,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "APP_NAME",
    "MAX_BODY_BYTES",
    "OracleConfig",
    "OracleState",
    "Served",
    "app_builder",
    "build_app",
    "deploy",
    "entry_dict",
    "oracle_deployment",
    "replica_access",
    "undeploy",
    "vocabulary_doc",
]

_log = logging.getLogger("medimesh.oracle")

MAX_BODY_BYTES = 64 * 1024
REFUSAL_LOG_AFTER_S = 5.0
_KEEPALIVE_S = 15.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ----------------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class OracleConfig:
    """Where the oracle reads from. ``router`` (an actor handle) overrides ``router_name``.
    ``run_id``: the run to serve; None follows the newest run that has a model."""

    database_url: str
    router_name: str | None = None
    router_namespace: str = "medimesh"
    poll_interval: float = 1.0
    max_body_bytes: int = MAX_BODY_BYTES
    router: Any = None
    load_ontology: bool = True
    run_id: str | None = None
    # Phenopacket queries: the assay → biomarker mapping file's JSON (medimesh.phenopackets);
    # give the one the sites trained with, so a phenopacket is encoded alike at both ends.
    label_codes: dict[str, Any] | None = None
    # /audit/verify's trusted signers: a signed roster file, or a directory of them (issue 15);
    # None: the chain is recomputed but the answer is never ok ("signers not checked").
    roster_path: str | None = None
    # Who may call and how often (medimesh.access); None: AccessPolicy.local(), no token.
    access: AccessPolicy | None = None


@dataclass(frozen=True, slots=True)
class Served:
    """What answers requests right now: one engine (one model) and the run it belongs to."""

    engine: DiagnosisEngine
    run_id: str
    voucher: Voucher | None = None  # the signed model_published entry that vouches for it


# ------------------------------------------------------------------------------------ state


def _engine_from(stored: StoredModel, state: dict[str, Any]) -> DiagnosisEngine:
    """Join a stored model with the setup round's statistics (kept in the checkpoint)."""
    if "mean" not in state or "std" not in state:
        raise StoreError("latest checkpoint has no standardization (mean/std)")
    model = stored.to_model()
    # A rare cohort with a larger panel (--diseases N) has N + 1 classes; its columns follow.
    n_diseases = model.n_classes - 1 if model.n_classes > cohort.N_CLASSES else cohort.PANEL_SIZE
    feats = cohort.features(n_diseases)
    saved = saved_model_for(
        model,
        feats,
        cohort.class_names(n_diseases),
        np.asarray(state["mean"], dtype=float),
        np.asarray(state["std"], dtype=float),
        round_=stored.round,
    )
    return DiagnosisEngine(saved, feats, profile=TrainingProfile.from_state(state))


class OracleState:
    """The store connection, the live engine and the NOTIFY fan-out for one app instance."""

    def __init__(self, config: OracleConfig) -> None:
        self.config = config
        self.store: Store | None = None
        self.served: Served | None = None
        self.last_error: str | None = None
        self.swaps = 0
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False
        self._ontology: Any = None
        self._router: Any = config.router
        self._connected = asyncio.Event()
        self.refused: dict[str, Any] | None = None  # the newest model refused, and why
        self._refused_since, self._refusal_logged = 0.0, False
        policy = config.access or AccessPolicy.local()
        self.verify_cache = VerifyCache(policy.verify_max_age, policy.verify_min_interval)
        self._verify_lock = asyncio.Lock()
        self.phenopacket_codes: Any = None
        if config.label_codes is not None:
            from medimesh.phenopackets import load_label_codes

            self.phenopacket_codes = load_label_codes(config.label_codes)

    @property
    def engine(self) -> DiagnosisEngine | None:
        served = self.served
        return None if served is None else served.engine

    @property
    def run_id(self) -> str | None:
        """The run served now (or the one this oracle was started for, before its model)."""
        served = self.served
        return served.run_id if served is not None else self.config.run_id

    # -- lifecycle

    async def start(self) -> None:
        """Start background work once; never raises (readiness reports what is missing)."""
        if self._started:
            return
        self._started = True
        self._tasks.append(asyncio.create_task(self._run(), name="oracle-watch"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.store is not None:
            await self.store.close()
            self.store = None

    def _announce(self, _seq: int = 0) -> None:
        """Wake every waiter (SSE streams, the model watcher): replace-and-set, race-free."""
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def changed(self) -> asyncio.Event:
        """The event the *next* announcement sets; grab it before reading the store."""
        return self._changed

    async def _run(self) -> None:
        if self.config.load_ontology:
            with contextlib.suppress(Exception):
                from medimesh.hpo import HpoAncestors

                self._ontology = await asyncio.to_thread(HpoAncestors.load)
        backoff = 0.2
        while not self._stopping:
            try:
                if self.store is None:
                    self.store = await Store.open(self.config.database_url, max_size=8)
                    self._connected.set()
                feed = await self.store.listen(self._announce)
                try:
                    backoff = 0.2
                    await self._watch_models()
                finally:
                    with contextlib.suppress(Exception):
                        await feed.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the current engine; retry the store
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.warning("oracle store watcher: %s", self.last_error)
                self._announce()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _watch_models(self) -> None:
        while not self._stopping:
            ev = self.changed()
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), self.config.poll_interval)

    async def _target_run(self, store: Store) -> str | None:
        """The configured run, else the newest run with a model (None: no model anywhere)."""
        if self.config.run_id is not None:
            return self.config.run_id
        return next((r.run_id for r in await store.runs() if r.model_hash is not None), None)

    async def refresh(self) -> bool:
        """Load the served run's newest model if it differs from the live one; True if swapped."""
        store = self.store
        if store is None:
            return False
        run = await self._target_run(store)
        if run is None:
            self.last_error = "no run has published a model yet"
            return False
        latest = await store.latest_model(run)
        if latest is None:
            self.last_error = f"run {run} has no model yet"
            return False
        current = self.served
        if current is not None and (current.engine.model_hash, current.run_id) == (
            latest.model_hash, run
        ):
            return False
        cp = await store.latest_checkpoint(run)
        if cp is None:
            self.last_error = f"run {run} has no checkpoint with the standardization yet"
            return False
        try:
            voucher = await self._vouch(store, latest, cp.state, run)
        except UnvouchedModel as exc:
            self._refuse(latest, run, str(exc))
            return False
        try:
            engine = _engine_from(latest, cp.state)
        except (StoreError, ValidationError) as exc:
            self.last_error = f"model {latest.model_hash[:12]}… not servable: {exc}"
            return False
        if self._ontology is not None:
            engine = DiagnosisEngine(
                engine.saved, engine.features, self._ontology, profile=engine.profile
            )
        self.served = Served(engine, run, voucher)  # the atomic swap: one reference assignment
        self.swaps += 1
        self.last_error = None
        self.refused = None
        _log.info("oracle serving run %s model %s (round %d)", run, latest.model_hash[:12],
                  latest.round)
        return True

    def roster_source(self) -> str:
        return "config" if self.config.roster_path else "store"

    def _roster_members(self) -> list[Member] | None:
        """Every member of the signed roster(s) at ``roster_path`` (None: none configured).
        A copy that does not verify trusts nobody: the model is refused, with the reason."""
        if not self.config.roster_path:
            return None
        try:
            rosters = read_signed_rosters([FilePath(self.config.roster_path)])
        except MediMeshError as exc:
            raise UnvouchedModel(f"roster refused: {exc}") from None
        return [m for r in rosters for m in r]

    async def _vouch(
        self, store: Store, latest: StoredModel, state: dict[str, Any], run: str
    ) -> Voucher:
        """The signed model_published entry for this model as it would serve (weights and the
        checkpoint's mean/std), from a coordinator on the roster; else UnvouchedModel."""
        if "mean" not in state or "std" not in state:
            raise UnvouchedModel("the checkpoint has no standardization (mean/std)")
        if hash_model(latest.to_model()) != latest.model_hash:
            raise UnvouchedModel(f"the stored weights of {latest.model_hash[:12]}… do not hash "
                                 "to its name (edited in the database)")
        members = self._roster_members()
        if members is None:
            members = [n.member() for n in await store.nodes()]
        coordinators, signers = roster_keys(members)
        entries = await store.entries(event="model_published", round=latest.round)
        return find_voucher(
            entries,
            model=latest.to_model(),
            mean=np.asarray(state["mean"], dtype=float),
            std=np.asarray(state["std"], dtype=float),
            spec_hash=spec_digest([f.name for f in cohort.features()], cohort.class_names()),
            run_id=run,
            coordinators=coordinators,
            signers=signers,
        )

    def _refuse(self, latest: StoredModel, run: str, reason: str) -> None:
        """Keep serving the previous verified model (if any) and say why the new one is not.

        Logged once the refusal has lasted ``REFUSAL_LOG_AFTER_S``: a new round's model row can
        reach the store a moment before its model_published entry does."""
        refused = {"model_hash": latest.model_hash, "round": latest.round, "run_id": run,
                   "reason": reason}
        now = time.monotonic()
        if refused != self.refused:
            self._refused_since, self._refusal_logged = now, False
        if not self._refusal_logged and now - self._refused_since >= REFUSAL_LOG_AFTER_S:
            _log.warning("oracle refuses model %s of run %s: %s", latest.model_hash[:12], run,
                         reason)
            self._refusal_logged = True
        self.refused = refused
        self.last_error = f"refused model {latest.model_hash[:12]}…: {reason}"

    async def run_for(self, store: Store, run: str | None) -> RunRecord | None:
        """The run a request names, else the served one, else the newest; 404 if unknown.

        None only when no run was named and the store holds no run at all.
        """
        wanted = run or self.run_id
        if wanted is None:
            runs = await store.runs()
            return runs[0] if runs else None
        record = await store.get_run(wanted)
        if record is None:
            raise HTTPException(
                404, f"no run {wanted!r} in this store (GET /runs lists the runs)"
            )
        return record

    async def require_store(self, wait: float = 5.0) -> Store:
        """The store, waiting up to ``wait`` s for the first connection; else 503."""
        if self.store is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), wait)
        if self.store is None:
            raise HTTPException(503, f"store not reachable yet ({self.last_error or 'starting'})")
        return self.store

    async def verified(self, store: Store) -> dict[str, Any]:
        """The /audit/verify answer: reused per :class:`VerifyCache`, computed by one request
        at a time (a flood waits for that one computation instead of starting its own)."""
        _, head = await store.head()
        answer = self.verify_cache.cached(head, time.monotonic())
        cached = answer is not None
        if answer is None:
            async with self._verify_lock:
                _, head = await store.head()
                answer = self.verify_cache.cached(head, time.monotonic())
                cached = answer is not None
                if answer is None:
                    answer = {**await self._check_trail(store),
                              "computed_at": time.time(), "computed_for_head": head}
                    self.verify_cache.put(head, time.monotonic(), answer)
        at = self.verify_cache.computed_at()
        age = 0.0 if at is None else max(0.0, time.monotonic() - at)
        return {**answer, "cached": cached, "age_s": round(age, 3)}

    async def _check_trail(self, store: Store) -> dict[str, Any]:
        """Recompute the chain; signers from the signed roster the oracle was given, never
        the database's nodes (no roster: never ok, "signers not checked")."""
        path = self.config.roster_path
        try:
            rosters = read_signed_rosters([FilePath(path)]) if path else None
        except MediMeshError as exc:  # a roster copy that does not verify: nothing trusted
            doc = await check_trail(store, None)
            return {**doc, "problem": f"roster refused: {exc}",
                    "problems": [f"roster refused: {exc}", *doc["problems"]]}
        return await check_trail(store, rosters)

    async def router(self) -> Any:
        """The router actor handle, looked up by name once; None when not configured."""
        if self._router is None and self.config.router_name:
            import ray

            self._router = await asyncio.to_thread(
                ray.get_actor, self.config.router_name, self.config.router_namespace
            )
        return self._router


# ---------------------------------------------------------------------------- request models

_ERR: dict[str, Any] = {
    "description": "Error with a human-readable detail",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {}},
                "required": ["detail"],
            }
        }
    },
}

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


# ------------------------------------------------------------------------------- vocabulary


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


def _example(ex: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """One example as /vocabulary returns it; refuses features the model does not have."""
    classes = cohort.class_names()
    symptoms = list(ex.get("symptoms", []))
    if "typical" in ex:
        freq = cohort.symptom_probabilities(classes.index(ex["resembles"]))
        symptoms = sorted(freq, key=lambda t: (-freq[t], t))[: ex["typical"]]
        how = f"the {ex['typical']} most frequent annotated features of {ex['resembles']}"
    else:
        how = f"{len(symptoms)} hand-picked symptoms"
    unknown = [t for t in (*symptoms, *ex["biomarkers"]) if t not in names]
    unknown += [g for g in ex["genes"] if f"gene:{g}" not in names]
    if ex["resembles"] not in (None, *classes):
        unknown.append(ex["resembles"])
    if unknown:  # a panel change must not ship an example the model cannot read
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


@functools.cache
def vocabulary_doc() -> dict[str, Any]:
    """The /vocabulary answer, built once from the cohort's feature list and the HPO panel."""
    feats = cohort.features()
    names = {f.name for f in feats}
    markers = [f for f in feats if f.kind == "lognormal"]
    examples = [_example(ex, names) for ex in _EXAMPLES]
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
        "classes": list(cohort.class_names()),
        "examples": examples,
        "hpo_release": str(panel.get("hpo_release", "")),
        "attribution": str(panel.get("attribution", "")),
    }


# ----------------------------------------------------------------------------------- helpers


def entry_dict(e: AuditEntry) -> dict[str, Any]:
    """An audit entry as JSON (every field, so a client can re-verify it)."""
    return {
        "seq": e.seq,
        "at": e.at,
        "actor": e.actor,
        "event": e.event,
        "round": e.round,
        "subject": e.subject,
        "body": e.body,
        "signature": e.signature,
        "prev_hash": e.prev_hash,
        "entry_hash": e.entry_hash,
        "writer": e.writer,
        "writer_signature": e.writer_signature,
    }


def _model_dict(m: StoredModel, active: str | None) -> dict[str, Any]:
    return {
        "model_hash": m.model_hash,
        "round": m.round,
        "parent_hash": m.parent_hash,
        "n_features": m.shape[0],
        "n_classes": m.shape[1],
        "provenance": m.provenance,
        "created_at": m.created_at,
        "active": m.model_hash == active,
    }


def _run_dict(r: RunRecord, served: str | None) -> dict[str, Any]:
    return {
        "run_id": r.run_id,
        "started_at": r.started_at,
        "rounds": r.rounds,
        "last_round": r.last_round,
        "final_top1": _finite(r.final_top1),
        "final_top3": _finite(r.final_top3),
        "model_hash": r.model_hash,
        "model_round": r.model_round,
        "info": _finite(r.info),
        "served": r.run_id == served,
    }


def _baselines_doc(run_id: str | None, setup: dict[str, Any]) -> dict[str, Any]:
    """/baselines from a run's signed ``setup_completed`` entry: one row per hospital."""
    raw = setup.get("baselines")
    rows = []
    for site, b in sorted(raw.items()) if isinstance(raw, dict) else []:
        if not isinstance(b, dict):
            continue
        # Coordinators before cross-site baselines wrote own-site scores as top1/top3/n_test.
        own1 = b.get("own_site_top1", b.get("top1"))
        own3 = b.get("own_site_top3", b.get("top3"))
        rows.append({
            "site": str(site),
            "own_site_top1": _finite(own1),
            "own_site_top3": _finite(own3),
            "own_site_n": b.get("own_site_n", b.get("n_test")),
            "all_sites_top1": _finite(b.get("all_sites_top1")),
            "all_sites_top3": _finite(b.get("all_sites_top3")),
            "all_sites_n": b.get("all_sites_n"),
            "all_sites_evaluated_by": b.get("all_sites_evaluated_by"),
        })
    return {
        "run_id": run_id,
        "cross_baselines": bool(setup.get("cross_baselines", False)),
        "definition": (
            "each hospital's isolated model (its own rows only): own_site_* scored on its own "
            "test split; all_sites_* on every site's test patients, the same patients the "
            "federated model's per-round top1/top3 are computed on"
        ),
        "sites": rows,
    }


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: replace them with null so a metrics row never breaks a response."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json_safe(obj: Any) -> Any:
    """Make an echoed request value encodable: a 422 must never fail while reporting one.

    Non-finite floats become the tokens the client sent ("NaN", "Infinity", "-Infinity");
    strings (and keys) with lone surrogates, which UTF-8 cannot hold, get them as "\\udXXX".
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {_json_safe(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _sse(entry: AuditEntry) -> bytes:
    data = json.dumps(entry_dict(entry), separators=(",", ":"), ensure_ascii=False)
    return f"id: {entry.seq}\nevent: audit\ndata: {data}\n\n".encode()


def _body_limit(app: ASGIApp, limit: int) -> ASGIApp:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    async def reject(send: Send) -> None:
        body = json.dumps({"detail": f"request body exceeds {limit} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = True
            if too_big:
                await reject(send)
                return
            await app(scope, receive, send)
            return
        # No length (chunked): buffer up to the limit, then replay.
        chunks: list[bytes] = []
        size, more = 0, scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await reject(send)
                return
            chunks.append(chunk)
            more = bool(msg.get("more_body", False))
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay if chunks else receive, send)

    return middleware


# --------------------------------------------------------------------------------------- app


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
        detail = _json_safe(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"store unavailable: {exc}"}, status_code=503)

    @app.post(
        "/diagnose",
        summary="Ranked differential for one patient",
        responses={413: _ERR, 503: _ERR},
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
            detail = [
                {"loc": ["body", *exc.field.split(".")], "msg": exc.message, "type": "value_error"}
            ]
            return JSONResponse({"detail": detail}, status_code=422)  # type: ignore[return-value]

    from medimesh.actors.phenopacket_api import add_phenopacket_route

    add_phenopacket_route(app, st, {413: _ERR, 503: _ERR})

    @app.get(
        "/network", summary="Nodes and message counts, AXL-topology-shaped", responses={503: _ERR}
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
                return _network_from_router(stats, topo)
            except Exception as exc:
                router_error = f"{type(exc).__name__}: {exc}"
        out = _network_from_nodes(await (await state.require_store()).nodes())
        if router_error:
            out["router_error"] = router_error
        return out

    @app.get("/audit", summary="Audit entries, keyset-paged by seq", responses={503: _ERR})
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
        page = rows[:limit]
        return {
            "entries": [entry_dict(e) for e in page],
            "next_after_seq": page[-1].seq if page else after_seq,
            "has_more": len(rows) > limit,
        }

    @app.get(
        "/audit/verify", summary="Recompute the hash chain and signatures", responses={503: _ERR}
    )
    async def audit_verify(request: Request) -> dict[str, Any]:
        # Cached (medimesh.access.VerifyCache): computed_at / computed_for_head / cached say
        # which computation answered.
        state = await st(request)
        return await state.verified(await state.require_store())

    @app.get(
        "/rounds",
        summary="One run's closed rounds and their metrics (default: the served run)",
        responses={404: _ERR, 503: _ERR},
    )
    async def rounds(
        request: Request, run: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None
    ) -> list[dict[str, Any]]:
        state = await st(request)
        store = await state.require_store()
        record = await state.run_for(store, run)
        if record is None:
            return []
        return [
            {
                "round": r.round,
                "metrics": _finite(r.metrics),
                "model_hash": r.model_hash,
                "closed_at": r.closed_at,
                "run_id": r.run_id,
            }
            for r in await store.rounds(record.run_id)
        ]

    @app.get("/runs", summary="Every training run in the store, newest first",
             responses={503: _ERR})
    async def runs(request: Request) -> list[dict[str, Any]]:
        state = await st(request)
        served = state.run_id
        return [_run_dict(r, served) for r in await (await state.require_store()).runs()]

    @app.get(
        "/baselines",
        summary="Each hospital's isolated model: on its own test split and on all sites'",
        responses={404: _ERR, 503: _ERR},
    )
    async def baselines(
        request: Request, run: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None
    ) -> dict[str, Any]:
        state = await st(request)
        store = await state.require_store()
        record = await state.run_for(store, run)
        body: dict[str, Any] = {}
        if record is not None:
            for e in reversed(await store.entries(event="setup_completed")):
                # entries from before runs had ids belong to the unnamed run
                if e.body.get("run_id", UNNAMED_RUN) == record.run_id:
                    body = e.body
                    break
        return _baselines_doc(None if record is None else record.run_id, body)

    @app.get(
        "/models",
        summary="Every stored global model, or one run's (metadata)",
        responses={404: _ERR, 503: _ERR},
    )
    async def models(
        request: Request, run: Annotated[str | None, Query(pattern=RUN_ID_PATTERN)] = None
    ) -> list[dict[str, Any]]:
        state = await st(request)
        store = await state.require_store()
        if run is not None:
            await state.run_for(store, run)  # 404 for an unknown run
        active = state.engine.model_hash if state.engine is not None else None
        return [_model_dict(m, active) for m in await store.models(run)]

    @app.get(
        "/models/{model_hash}",
        summary="One model's metadata and provenance",
        responses={404: _ERR, 503: _ERR},
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
        out = _model_dict(m, active)
        served = state.run_id
        rows = await store.rounds()  # every run's; the served run's round first if both have it
        rows.sort(key=lambda r: r.run_id != served)
        out["round_metrics"] = next(
            (_finite(r.metrics) for r in rows if r.model_hash == model_hash), None
        )
        return out

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
        start = after_seq or 0
        if last_event_id is not None:
            if not last_event_id.strip().isdigit():
                detail = [
                    {
                        "loc": ["header", "last-event-id"],
                        "msg": "expected a sequence number",
                        "type": "value_error",
                    }
                ]
                return JSONResponse({"detail": detail}, status_code=422)  # type: ignore[return-value]
            start = int(last_event_id)

        async def stream() -> AsyncIterator[bytes]:
            last, sent = start, 0
            yield b"retry: 2000\n\n"
            while max_events is None or sent < max_events:
                ev = state.changed()
                want = 500 if max_events is None else min(500, max_events - sent)
                batch = await store.entries(after_seq=last, limit=want)
                for e in batch:
                    yield _sse(e)
                    last, sent = e.seq, sent + 1
                if batch:
                    continue
                if await request.is_disconnected():
                    return
                try:
                    await asyncio.wait_for(ev.wait(), _KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/vocabulary", summary="Symptoms, biomarkers, genes, classes and worked examples")
    async def vocabulary() -> VocabularyOut:
        return VocabularyOut.model_validate(vocabulary_doc())

    @app.get("/health", summary="The process is up")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="A model is loaded and the store answers", responses={503: _ERR})
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
        body = {
            "ready": not problems,
            "model_hash": engine.model_hash if engine else None,
            "model_round": engine.round if engine else None,
            "run_id": state.run_id,
            "vouched_by": (
                None if served is None or served.voucher is None else served.voucher.to_dict()
            ),
            "refused": state.refused,
            "roster": state.roster_source(),
            "problems": problems,
        }
        return JSONResponse(body, status_code=200 if not problems else 503)

    return app


def configure(app: FastAPI, config: OracleConfig) -> None:
    """Attach state to an app and install the body-size limit and, outermost, the access
    guard (token, rate limits, live-feed cap) before it starts serving."""
    app.state.oracle = OracleState(config)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_Guard, policy=config.access or AccessPolicy.local())


class _Guard:
    """The access policy (medimesh.access) at the ASGI edge: 401, 429 or 503 before routing.

    The client address is the ASGI ``client`` (Serve's proxy passes it through; uvicorn
    rewrites it from X-Forwarded-For only for peers in FORWARDED_ALLOW_IPS, 127.0.0.1 by
    default).
    """

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self._app = app
        self.policy = policy
        self.limiters = {g: RateLimiter(lim) for g, lim in policy.limits.items()}
        self.streams = StreamSlots(policy.max_streams, policy.max_streams_per_client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
        if root and path.startswith(root):  # mounted under a prefix: judge the app's path
            path = path[len(root):] or "/"
        client = scope.get("client")
        who = str(client[0]) if client else "unknown"
        if self.policy.token is not None and path not in EXEMPT_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not token_matches(self.policy.token, bearer_token(auth.decode("latin-1"))):
                await _refuse(send, 401, "missing or wrong API token: send 'Authorization: "
                              "Bearer <token>' (the token `medimesh serve` printed or wrote to "
                              "its token file; clients read $MEDIMESH_API_TOKEN)",
                              [(b"www-authenticate", b'Bearer realm="medimesh"')])
                return
        group = limit_group(path)
        limiter = self.limiters.get(group) if group is not None else None
        if limiter is not None:
            wait = limiter.take(who, time.monotonic())
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await _refuse(send, 429, f"rate limit: too many {group} requests from this "
                              f"address; retry after {retry} s",
                              [(b"retry-after", str(retry).encode())])
                return
        if group != "events" or scope.get("method") != "GET":
            await self._app(scope, receive, send)
            return
        refused = self.streams.acquire(who)
        if refused is not None:
            await _refuse(send, 503, refused, [(b"retry-after", b"5")])
            return
        try:
            await self._app(scope, receive, send)
        finally:
            self.streams.release(who)


async def _refuse(send: Send, status: int, detail: str,
                  headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


class _BodyLimit:
    """Starlette middleware class around :func:`_body_limit`."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self._inner = _body_limit(app, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inner(scope, receive, send)


def _network_from_router(stats: dict[str, Any], topo: dict[str, Any]) -> dict[str, Any]:
    nodes = [{"peer_id": pid, **info} for pid, info in sorted(stats.get("peers", {}).items())]
    root = topo.get("our_public_key", "")
    if root and root not in stats.get("peers", {}):
        nodes.insert(0, {"peer_id": root, "name": "router", "role": "router", "reachable": True})
    return {
        "source": "router",
        "nodes": nodes,
        "edges": list(stats.get("edges", [])),
        "messages_by_type": dict(stats.get("messages_by_type", {})),
        "bytes_by_type": dict(stats.get("bytes_by_type", {})),
        "topology": topo,
    }


def _network_from_nodes(records: list[Any]) -> dict[str, Any]:
    nodes = [
        {
            "peer_id": n.peer_id,
            "name": n.name,
            "role": n.role,
            "reachable": None,
            "msgs_out": 0,
            "bytes_out": 0,
            "msgs_in": 0,
            "bytes_in": 0,
            "dropped": 0,
            "last_seen": None,
        }
        for n in records
    ]
    root = next((n.peer_id for n in records if n.role == "router"), "")
    peers = sorted(n.peer_id for n in records if n.peer_id != root)
    tree = [{"public_key": p, "parent": root, "sequence": i} for i, p in enumerate(peers)]
    return {
        "source": "store",
        "nodes": nodes,
        "edges": [],
        "messages_by_type": {},
        "bytes_by_type": {},
        "topology": {
            "our_ipv6": "",
            "our_public_key": root,
            "peers": peers,
            "tree": tree if root else [],
        },
    }


# ------------------------------------------------------------------------------------ Serve


@functools.cache
def oracle_deployment() -> Any:
    """The Serve deployment class (built on first use, so importing this module is cheap).

    The ingress is late-bound (``@serve.ingress()`` + ``__serve_build_asgi_app__``): Serve
    freezes a copy of an app passed to ``ingress(app)`` at decoration time, so constructor
    arguments (database URL, router name) could not reach it. Building the app in the replica
    from those arguments gives the same FastAPI app :func:`build_app` returns in tests.
    """
    from ray import serve

    @serve.deployment(
        name="oracle",
        max_ongoing_requests=128,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
        health_check_period_s=5,
    )
    @serve.ingress()
    class Oracle:
        """One replica: :func:`build_app` with this replica's store and engine."""

        def __init__(
            self,
            database_url: str,
            router_name: str | None = None,
            router_namespace: str = "medimesh",
            poll_interval: float = 1.0,
            run_id: str | None = None,
            label_codes: dict[str, Any] | None = None,
            roster_path: str | None = None,
            access: dict[str, Any] | None = None,
            api_token_file: str | None = None,
        ) -> None:
            self._config = OracleConfig(
                database_url, router_name, router_namespace, poll_interval, run_id=run_id,
                label_codes=label_codes, roster_path=roster_path,
                access=replica_access(access, api_token_file),
            )

        def __serve_build_asgi_app__(self) -> FastAPI:
            return build_app(self._config)

    return Oracle


def replica_access(
    access: dict[str, Any] | None, api_token_file: str | None
) -> AccessPolicy | None:
    """A replica's policy: the one ``deploy`` passed, else (serve.yaml) a token from
    ``$MEDIMESH_API_TOKEN`` or ``api_token_file`` on the replica's node (created 0600 there
    if missing, medimesh.api_token); None: loopback defaults."""
    if access is not None:
        return AccessPolicy.from_dict(access)
    if not api_token_file:
        return None
    import os
    from pathlib import Path as _Path

    from medimesh.api_token import resolve_token

    token = resolve_token(None, os.environ, _Path(api_token_file).expanduser())
    return AccessPolicy.exposed(token.token)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point (``import_path: medimesh.actors.oracle:app_builder``)."""
    return oracle_deployment().bind(
        args["database_url"],
        args.get("router_name"),
        args.get("router_namespace", "medimesh"),
        float(args.get("poll_interval", 1.0)),
        args.get("run_id"),
        args.get("label_codes"),
        args.get("roster_path"),
        args.get("access"),
        args.get("api_token_file"),
    )


def deploy(
    database_url: str,
    router_name: str | None = None,
    port: int = 8000,
    *,
    router_namespace: str = "medimesh",
    poll_interval: float = 1.0,
    num_replicas: int = 1,
    run_id: str | None = None,
    label_codes: dict[str, Any] | None = None,
    roster_path: str | None = None,
    host: str = "127.0.0.1",
    access: AccessPolicy | None = None,
) -> str:
    """Start Serve on ``host``:``port`` with the oracle at ``/``; returns the base URL.
    ``run_id``: the run to serve (None: the newest run with a model). ``roster_path``: the
    signed roster(s) ``/audit/verify`` takes its signers from. ``access``: the token,
    rate limits and stream cap (None: AccessPolicy.local()); a ``host`` beyond loopback
    without a token is refused (medimesh.access.policy_for picks one).

    Needs a running Ray (``ray.init``); Serve's controller and proxy start on first call.
    """
    from ray import serve

    # Serve's driver-side INFO lines are chatter for a MediMesh user, and one misleads: every
    # serve.run after serve.start logs "New http_options ... will not be applied" although
    # serve.start already applied them (Ray 2.60 serve.run always calls serve_start). The
    # callers print the oracle's URL themselves; Serve's warnings and errors still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if not is_loopback(host) and (access is None or not access.requires_token):
        raise ValueError(f"refusing to serve the oracle on {host} without an API token")
    serve.start(http_options={"host": host, "port": port})
    dep = oracle_deployment().options(num_replicas=num_replicas)
    serve.run(
        dep.bind(database_url, router_name, router_namespace, poll_interval, run_id, label_codes,
                 roster_path, None if access is None else access.to_dict()),
        name=APP_NAME,
        route_prefix="/",
    )
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{reach}]:{port}" if ":" in reach else f"http://{reach}:{port}"


APP_NAME = "medimesh-oracle"
"""The oracle's Serve application name."""


def undeploy() -> None:
    """Remove the oracle's Serve application; Serve itself stays up (and stops with Ray).

    Not ``serve.shutdown()``: in Ray 2.60 the controller kills itself while the shutdown call
    is still waiting on it, and because the controller's tasks are retried forever Ray logs
    ``Task ServeController.graceful_shutdown failed … will be retried`` on every stop. On a
    shared cluster (``--ray-address``) shutting Serve down would also take other applications
    with it. A local Ray we started ends with the process, Serve's actors with it.
    """
    from ray import serve

    serve.delete(APP_NAME)
