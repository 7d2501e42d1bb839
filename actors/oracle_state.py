"""The oracle's per-app state: the store connection, the live engine and the NOTIFY fan-out.

Hot swap: a background task reacts to the store's NOTIFY (and polls every ``poll_interval``
seconds as a fallback), builds a new immutable engine for the latest vouched model
(medimesh.oracle.serving decides which) and replaces ``OracleState.served`` in one assignment.
A request reads that reference once, so it is answered entirely by one model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path as FilePath
from typing import Any

from fastapi import HTTPException

from medimesh.access import AccessPolicy, VerifyCache
from medimesh.audit_cli import check_trail, read_signed_rosters
from medimesh.diagnosis import DiagnosisEngine, ValidationError
from medimesh.errors import MediMeshError
from medimesh.identity import Member
from medimesh.oracle.config import OracleConfig
from medimesh.oracle.serving import (
    RefusalLog,
    Served,
    check_servable,
    engine_from,
    voucher_for,
)
from medimesh.release import UnvouchedModel, Voucher
from medimesh.store import RunRecord, Store, StoredModel, StoreError

__all__ = ["OracleState"]

_log = logging.getLogger("medimesh.oracle")


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
        self.refusals = RefusalLog()  # the newest model refused, and why
        policy = config.access or AccessPolicy.local()
        self.verify_cache = VerifyCache(policy.verify_max_age, policy.verify_min_interval)
        self._verify_lock = asyncio.Lock()
        self.phenopacket_codes: Any = None
        if config.label_codes is not None:
            from medimesh.phenopackets import load_label_codes

            self.phenopacket_codes = load_label_codes(config.label_codes)

    @property
    def refused(self) -> dict[str, Any] | None:
        """The newest model refused and why (None: the served model is the newest)."""
        return self.refusals.current

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
            engine = engine_from(latest, cp.state)
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
        self.refusals.clear()
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
        """The voucher for this model as it would serve (medimesh.oracle.serving), with the
        roster's members (no roster: the store's enrolled nodes); else UnvouchedModel."""
        check_servable(latest, state)
        members = self._roster_members()
        if members is None:
            members = [n.member() for n in await store.nodes()]
        entries = await store.entries(event="model_published", round=latest.round)
        return voucher_for(latest, state, run, members, entries)

    def _refuse(self, latest: StoredModel, run: str, reason: str) -> None:
        """Keep serving the previous verified model (if any) and say why the new one is not."""
        if self.refusals.refuse(latest.model_hash, latest.round, run, reason, time.monotonic()):
            _log.warning("oracle refuses model %s of run %s: %s", latest.model_hash[:12], run,
                         reason)
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
