"""The audit writer actor: sequences signed events into the hash chain and persists them.

It is also the one place that records models, rounds and checkpoints, so the rest of the
federation never talks to the database. With a ``database_url`` everything goes to PostgreSQL
through :class:`BufferedSink`; without one it lives in memory (or a JSONL file for the trail)
behind the same methods, so callers never branch. While the database is down, audit entries and
records wait in order in bounded buffers and are written on the next call or :meth:`flush`.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medimesh.actors import telemetry
from medimesh.audit import (
    GENESIS,
    AuditChain,
    AuditEntry,
    AuditEvent,
    AuditSink,
    JsonlSink,
    MemorySink,
    verify_chain,
)
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Roster
from medimesh.model import Model
from medimesh.model import model_hash as hash_model
from medimesh.runs import UNNAMED_RUN
from medimesh.store import (
    BufferedSink,
    PostgresSink,
    Store,
    StoreBackpressure,
    StoredModel,
    StoreError,
    StoreUnavailable,
)

__all__ = ["Auditor"]

_log = logging.getLogger(__name__)
R = TypeVar("R")

MAX_PENDING_RECORDS = 10_000
"""Models/rounds/checkpoints held while the database is down; beyond it, backpressure."""

CACHED_MODELS = 64
"""With a database, the newest models kept in memory to answer reads during an outage."""


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy to Python, NaN/inf to None (jsonb has no NaN; metrics mean n/a)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass(frozen=True, slots=True)
class _ModelRec:
    model_hash: str
    round: int
    parent_hash: str | None
    weights: np.ndarray
    bias: np.ndarray
    updates: tuple[str, ...]
    verdicts: tuple[str, ...]
    created_at: float

    def summary(self) -> dict[str, Any]:
        return {
            "model_hash": self.model_hash,
            "round": self.round,
            "parent_hash": self.parent_hash,
            "provenance": {"updates": list(self.updates), "verdicts": list(self.verdicts)},
            "n_features": int(self.weights.shape[0]),
            "n_classes": int(self.weights.shape[1]),
            "created_at": self.created_at,
        }

    def full(self) -> dict[str, Any]:
        return {**self.summary(), "weights": self.weights.copy(), "bias": self.bias.copy()}

    @classmethod
    def from_stored(cls, m: StoredModel) -> _ModelRec:
        model = m.to_model()
        return cls(
            m.model_hash,
            m.round,
            m.parent_hash,
            model.weights,
            model.bias,
            tuple(m.provenance.get("updates", [])),
            tuple(m.provenance.get("verdicts", [])),
            m.created_at,
        )


@dataclass(frozen=True, slots=True)
class _RoundRec:
    round: int
    metrics: dict[str, Any]
    model_hash: str | None
    closed_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "metrics": self.metrics,
            "model_hash": self.model_hash,
            "closed_at": self.closed_at,
        }


@dataclass(frozen=True, slots=True)
class _CheckpointRec:
    round: int
    state: dict[str, Any]
    model_hash: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.round, "state": self.state, "model_hash": self.model_hash}


_Record = _ModelRec | _RoundRec | _CheckpointRec


@dataclass(slots=True)
class _Memory:
    """What this process recorded: the store without a database, a read cache with one."""

    model_limit: int | None
    models: dict[str, _ModelRec] = field(default_factory=dict)
    rounds: dict[int, _RoundRec] = field(default_factory=dict)
    checkpoint: _CheckpointRec | None = None

    def add(self, rec: _Record) -> None:
        if isinstance(rec, _ModelRec):
            self.models.setdefault(rec.model_hash, rec)
            while self.model_limit is not None and len(self.models) > self.model_limit:
                del self.models[next(iter(self.models))]
        elif isinstance(rec, _RoundRec):
            self.rounds[rec.round] = rec
        else:
            self.checkpoint = rec


async def _apply(store: Store, rec: _Record, run: str) -> None:
    """Write one record of ``run``; every write is idempotent or append-only (retry-safe)."""
    if isinstance(rec, _ModelRec):
        await store.put_model(
            Model(rec.weights, rec.bias),
            rec.round,
            parent_hash=rec.parent_hash,
            updates=rec.updates,
            verdicts=rec.verdicts,
            created_at=rec.created_at,
            run=run,
        )
    elif isinstance(rec, _RoundRec):
        await store.put_round(rec.round, rec.metrics, rec.model_hash, rec.closed_at, run=run)
    else:
        await store.save_checkpoint(rec.round, rec.state, rec.model_hash, run=run)


class Auditor:
    """Single writer of the trail, so the chain has one total order; also the record keeper.

    The trail is one chain across runs; models, rounds and checkpoints are recorded under
    this auditor's ``run_id`` (medimesh.runs), and read back for that run only.
    """

    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        path: str | None = None,
        database_url: str | None = None,
        *,
        max_buffer: int = 10_000,
        run_id: str = UNNAMED_RUN,
        run_info: dict[str, Any] | None = None,
        router: Any = None,
        signer_rosters: Sequence[str] = (),
    ) -> None:
        """``max_buffer`` bounds the entries held while the database is down (then backpressure).
        ``run_id`` names the run whose records this auditor keeps; ``run_info`` (JSON) is
        stored with the run's row. ``router`` (a handle or ActorName): where signed chain
        heads go to every hospital each round (medimesh.witness); None sends none.
        ``signer_rosters``: signed roster files (their text) of earlier runs whose members may
        also have signed this chain; each must verify (medimesh.signed_roster)."""
        from medimesh.signed_roster import verify_signed_roster

        self._identity = Identity.from_seed(seed)
        self.run_id = run_id
        self._roster = Roster.from_json(roster_json)
        self._signers = {m.peer_id for m in self._roster}
        for text in signer_rosters:
            self._signers |= {m.peer_id for m in verify_signed_roster(text)}
        self._router_ref = router
        self._router: Any = None
        self.heads_sent = 0
        self._lock = threading.RLock()
        self._closed = False
        self._pending: list[_Record] = []
        self._pg: PostgresSink | None = None
        self._buffered: BufferedSink | None = None
        self._sink: AuditSink
        if database_url:
            # The owner only migrates and grants; the trail is written as the app role, which
            # can neither alter the append-only trigger nor update or delete (medimesh.db_roles).
            import asyncio

            from medimesh.db_roles import ensure_app_role

            self.database_url = asyncio.run(ensure_app_role(database_url))
            self._pg = PostgresSink(self.database_url, migrate=False)
            try:
                head = self._pg.head()  # no safe chain without knowing where it ends
                members = list(self._roster)

                async def enrol(store: Store) -> None:
                    await store.start_run(run_id, time.time(), _plain(run_info or {}))
                    for m in members:
                        await store.register_node(m)

                self._pg.call(enrol)
            except BaseException:
                self._pg.close()
                raise
            self._buffered = BufferedSink(self._pg, max_buffer=max_buffer)
            self._sink = self._buffered
            self._memory = _Memory(model_limit=CACHED_MODELS)
        else:
            self._sink = JsonlSink(Path(path)) if path else MemorySink()
            last = list(self._sink.entries())
            head = (last[-1].seq, last[-1].entry_hash) if last else (0, GENESIS)
            self._memory = _Memory(model_limit=None)
        self._chain = AuditChain(self._identity, *head)

    # ------------------------------------------------------------------------- audit trail

    def append(self, events: Sequence[AuditEvent]) -> int:
        """Chain and persist events; returns the head seq.

        If the sink refuses the batch (e.g. :class:`StoreBackpressure`), the chain is rewound
        and the exception propagates: the caller still holds its events and nothing is dropped.
        """
        with self._lock:
            if self._closed:
                raise StoreError("the auditor is closed; its events were not chained")
            before = self._chain.head
            entries = self._chain.extend(events)
            try:
                self._sink.write(entries)
            except BaseException:
                self._chain = AuditChain(self._identity, *before)
                raise
            finally:  # the backlog only changes when the auditor is called: report it here
                telemetry.record_backlog(self.backlog())
            return self._chain.head[0]

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Retry buffered entries and records until none are left (True) or time runs out."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._buffered is None:
                return True
            drained = self._buffered.flush(timeout=timeout_s)
            while drained and not self._drain_records():
                if time.monotonic() + 0.2 > deadline:
                    return False
                time.sleep(0.2)
            telemetry.record_backlog(self.backlog())
            return drained

    def backlog(self) -> int:
        """Entries plus records waiting for the database (always 0 without one)."""
        with self._lock:
            return (self._buffered.pending if self._buffered else 0) + len(self._pending)

    def head(self) -> tuple[int, str]:
        return self._chain.head

    def entries(
        self, event: str | None = None, round_: int | None = None, limit: int = 0
    ) -> list[AuditEntry]:
        """Matching entries in seq order; with ``limit``, only the newest ``limit`` of them."""
        with self._lock:
            if self._pg is not None and self._buffered is not None:
                self._buffered.flush(timeout=0)
                pending = [e for e in self._buffered.buffered() if _match(e, event, round_)]
                pg = self._pg
                stored = pg.call(lambda s: s.tail(limit or 2**62, event=event, round=round_))
                last = stored[-1].seq if stored else 0
                rows = stored + [e for e in pending if e.seq > last]
            else:
                rows = [e for e in self._sink.entries() if _match(e, event, round_)]
            return rows[-limit:] if limit else rows

    def verify(self) -> dict[str, Any]:
        """Recompute the whole chain; the known signers are this run's roster and the signed
        rosters it was given, never the database's ``nodes`` table (which the database's
        operator can rewrite)."""
        known = set(self._signers)
        with self._lock:
            if self._pg is not None and self._buffered is not None:
                if self._buffered.flush(timeout=0):
                    return self._pg.verify(known).to_dict()  # also checks body vs canonical
                return verify_chain(self._buffered.entries(), known).to_dict()
            return verify_chain(self._sink.entries(), known).to_dict()

    def witness_head(self, round_: int = -1) -> dict[str, Any]:
        """Sign the chain head and send it, sealed, to every hospital on the roster (through the
        router, fire-and-forget); returns the head. Hospitals keep it (medimesh.witness)."""
        from medimesh.protocol import ChainHead
        from medimesh.wire import seal
        from medimesh.witness import sign_head

        with self._lock:
            length, head_hash = self._chain.head
        head = sign_head(self._identity, length, head_hash, time.time())
        hospitals = sorted(m.peer_id for m in self._roster.with_role("hospital"))
        if self._router_ref is not None and hospitals and length > 0:
            from medimesh.actors.base import resolve

            if self._router is None:
                self._router = resolve(self._router_ref)
            msg = ChainHead(head.length, head.head_hash, head.at, head.signature)
            envelope = seal(self._identity, msg.TYPE, hospitals, max(round_, 0), msg.to_payload())
            self._router.send.remote(envelope)
            self.heads_sent += 1
        return {"length": head.length, "head_hash": head.head_hash, "writer": head.writer,
                "at": head.at, "signature": head.signature}

    # ------------------------------------------------------------------------------ records

    def _drain_records(self) -> bool:
        """Write pending records in order; True once none are left. Non-transient errors raise."""
        pg = self._pg
        if pg is None:
            self._pending.clear()
            return True
        while self._pending:
            rec = self._pending[0]
            try:
                pg.call(functools.partial(_apply, rec=rec, run=self.run_id))
            except StoreUnavailable as exc:
                _log.warning("store unavailable, %d record(s) pending: %s", len(self._pending), exc)
                return False
            del self._pending[0]
        return True

    def _record(self, rec: _Record) -> None:
        with self._lock:
            if self._closed:
                raise StoreError("the auditor is closed; the record was not stored")
            self._memory.add(rec)
            if self._pg is None:
                return
            if len(self._pending) >= MAX_PENDING_RECORDS:
                self._drain_records()
                if len(self._pending) >= MAX_PENDING_RECORDS:
                    raise StoreBackpressure(
                        f"record buffer full ({len(self._pending)} pending while the database"
                        " is unavailable)"
                    )
            self._pending.append(rec)
            self._drain_records()
            telemetry.record_backlog(self.backlog())

    def record_model(
        self,
        model_hash: str,
        round_: int,
        parent_hash: str,
        weights: np.ndarray,
        bias: np.ndarray,
        updates: list[str],
        verdicts: list[str],
    ) -> None:
        """Store a global model with its provenance (the update and verdict digests).

        The hash is recomputed here, so a stored model is always named by its own parameters.
        An empty ``parent_hash`` marks the initial model.
        """
        w = np.ascontiguousarray(weights, dtype=np.float32)
        b = np.ascontiguousarray(bias, dtype=np.float32)
        model = Model(w, b)
        actual = hash_model(model)
        if actual != model_hash:
            raise ConfigError(
                f"model hash {model_hash[:12]}… does not match its parameters ({actual[:12]}…)"
            )
        self._record(
            _ModelRec(
                model_hash,
                int(round_),
                parent_hash or None,
                w.copy(),
                b.copy(),
                tuple(str(u) for u in updates),
                tuple(str(v) for v in verdicts),
                time.time(),
            )
        )

    def record_round(self, round_: int, metrics: dict[str, Any], model_hash: str) -> None:
        """Store a closed round's aggregate metrics (NaN becomes null) and resulting model."""
        self._record(_RoundRec(int(round_), _plain(metrics), model_hash or None, time.time()))
        self.witness_head(int(round_))

    def save_checkpoint(self, round_: int, state: dict[str, Any], model_hash: str) -> None:
        """Save coordinator state so a restarted coordinator resumes at this round."""
        self._record(_CheckpointRec(int(round_), _plain(state), model_hash or None))

    def _pending_of(self, kind: type[R]) -> list[R]:
        return [r for r in self._pending if isinstance(r, kind)]

    def get_model(self, model_hash: str) -> dict[str, Any] | None:
        """A model with weights, bias and provenance, or None if it was never recorded."""
        with self._lock:
            for rec in reversed(self._pending_of(_ModelRec)):
                if rec.model_hash == model_hash:
                    return rec.full()
            pg = self._pg
            if pg is not None:
                try:
                    stored = pg.call(lambda s: s.get_model(model_hash))
                except StoreUnavailable:
                    _log.warning("store unavailable: get_model answered from memory")
                else:
                    return None if stored is None else _ModelRec.from_stored(stored).full()
            hit = self._memory.models.get(model_hash)
            return None if hit is None else hit.full()

    def models(self) -> list[dict[str, Any]]:
        """Every model this run recorded, oldest round first, without parameters."""
        run = self.run_id
        with self._lock:
            recs = list(self._memory.models.values())
            pg = self._pg
            if pg is not None:
                try:
                    stored = pg.call(lambda s: s.models(run))
                except StoreUnavailable:
                    _log.warning("store unavailable: models answered from memory")
                else:
                    seen = {m.model_hash for m in stored}
                    recs = [_ModelRec.from_stored(m) for m in stored] + [
                        r for r in self._pending_of(_ModelRec) if r.model_hash not in seen
                    ]
            recs.sort(key=lambda r: (r.round, r.created_at))
            return [r.summary() for r in recs]

    def rounds(self) -> list[dict[str, Any]]:
        """This run's recorded rounds: metrics and model hash, in round order."""
        run = self.run_id
        with self._lock:
            by_round = dict(self._memory.rounds)
            pg = self._pg
            if pg is not None:
                try:
                    stored = pg.call(lambda s: s.rounds(run))
                except StoreUnavailable:
                    _log.warning("store unavailable: rounds answered from memory")
                else:
                    by_round = {
                        r.round: _RoundRec(r.round, r.metrics, r.model_hash, r.closed_at or 0.0)
                        for r in stored
                    }
                    by_round.update({r.round: r for r in self._pending_of(_RoundRec)})
            return [by_round[k].as_dict() for k in sorted(by_round)]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """This run's newest checkpoint ({"round", "state", "model_hash"}), or None."""
        run = self.run_id
        with self._lock:
            pending = self._pending_of(_CheckpointRec)
            if pending:
                return dict(pending[-1].as_dict())
            pg = self._pg
            if pg is not None:
                try:
                    cp = pg.call(lambda s: s.latest_checkpoint(run))
                except StoreUnavailable:
                    _log.warning("store unavailable: checkpoint answered from memory")
                else:
                    if cp is None:
                        return None
                    return _CheckpointRec(cp.round, cp.state, cp.model_hash).as_dict()
            mem = self._memory.checkpoint
            return None if mem is None else mem.as_dict()

    # ------------------------------------------------------------------------------- close

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flush what can be flushed, then stop the sink's loop thread; True if nothing is left.

        Whatever could not be written is logged, never silently discarded.
        """
        with self._lock:
            self._closed = True
            if self._buffered is None:
                return True
            drained = self.flush(timeout_s)
            left = self.backlog()
            if left:
                _log.error("auditor closing with %d entries/records not written", left)
            self._buffered.close(timeout=0)
            self._buffered = None
            self._pg = None
            return drained and not left

    def deliver(self, envelope: bytes) -> None:
        """A remote node's ``audit_events`` through the router: chained if every check passes
        (medimesh.audit_ingest), else refused whole and the refusal chained with its reason."""
        from medimesh.audit import sign_event
        from medimesh.audit_ingest import ingest

        got = ingest(self._identity, {m.peer_id for m in self._roster}, envelope)
        if got.refused:
            _log.warning("audit events refused: %s", got.refused)
            self.append([sign_event(self._identity, "audit_events_refused", -1, got.sender,
                                    got.refusal_body())])
        elif got.accepted:
            self.append(got.accepted)


def _match(e: AuditEntry, event: str | None, round_: int | None) -> bool:
    return (event is None or e.event == event) and (round_ is None or e.round == round_)

