"""The auditor's record keeping: models, rounds and checkpoints of one run.

:class:`RecordKeeper` holds what this process recorded (the store without a database, a read
cache with one) and the records still waiting for the database, in order, while it is down;
reads merge the database's rows with those pending ones. The auditor actor
(``medimesh.actors.auditor``) owns the lock and the audit trail and calls in here.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from medimesh.audit import AuditEntry
from medimesh.errors import ConfigError
from medimesh.model import Model
from medimesh.model import model_hash as model_hash_of
from medimesh.store import PostgresSink, Store, StoreBackpressure, StoredModel, StoreUnavailable

__all__ = [
    "CACHED_MODELS",
    "MAX_PENDING_RECORDS",
    "CheckpointRec",
    "Memory",
    "ModelRec",
    "Rec",
    "RecordKeeper",
    "RoundRec",
    "match",
    "plain",
]

_log = logging.getLogger("medimesh.actors.auditor")
R = TypeVar("R")

MAX_PENDING_RECORDS = 10_000
"""Models/rounds/checkpoints held while the database is down; beyond it, backpressure."""

CACHED_MODELS = 64
"""With a database, the newest models kept in memory to answer reads during an outage."""


def plain(obj: Any) -> Any:
    """JSON-safe copy: numpy to Python, NaN/inf to None (jsonb has no NaN; metrics mean n/a)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def match(e: AuditEntry, event: str | None, round_: int | None) -> bool:
    """Whether an audit entry is of ``event`` (None: any) in ``round_`` (None: any)."""
    return (event is None or e.event == event) and (round_ is None or e.round == round_)


@dataclass(frozen=True, slots=True)
class ModelRec:
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
    def checked(
        cls, model_hash: str, round_: int, parent_hash: str, weights: np.ndarray,
        bias: np.ndarray, updates: Sequence[str], verdicts: Sequence[str], at: float,
    ) -> ModelRec:
        """A record of a global model with its provenance (the update and verdict digests).

        The hash is recomputed here, so a stored model is always named by its own parameters
        (ConfigError otherwise). An empty ``parent_hash`` marks the initial model.
        """
        w = np.ascontiguousarray(weights, dtype=np.float32)
        b = np.ascontiguousarray(bias, dtype=np.float32)
        actual = model_hash_of(Model(w, b))
        if actual != model_hash:
            raise ConfigError(
                f"model hash {model_hash[:12]}… does not match its parameters ({actual[:12]}…)"
            )
        return cls(
            model_hash, int(round_), parent_hash or None, w.copy(), b.copy(),
            tuple(str(u) for u in updates), tuple(str(v) for v in verdicts), at,
        )

    @classmethod
    def from_stored(cls, m: StoredModel) -> ModelRec:
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
class RoundRec:
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
class CheckpointRec:
    round: int
    state: dict[str, Any]
    model_hash: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"round": self.round, "state": self.state, "model_hash": self.model_hash}


Rec = ModelRec | RoundRec | CheckpointRec


@dataclass(slots=True)
class Memory:
    """What this process recorded: the store without a database, a read cache with one."""

    model_limit: int | None
    models: dict[str, ModelRec] = field(default_factory=dict)
    rounds: dict[int, RoundRec] = field(default_factory=dict)
    checkpoint: CheckpointRec | None = None

    def add(self, rec: Rec) -> None:
        if isinstance(rec, ModelRec):
            self.models.setdefault(rec.model_hash, rec)
            while self.model_limit is not None and len(self.models) > self.model_limit:
                del self.models[next(iter(self.models))]
        elif isinstance(rec, RoundRec):
            self.rounds[rec.round] = rec
        else:
            self.checkpoint = rec


async def _apply(store: Store, rec: Rec, run: str) -> None:
    """Write one record of ``run``; every write is idempotent or append-only (retry-safe)."""
    if isinstance(rec, ModelRec):
        await store.put_model(
            Model(rec.weights, rec.bias),
            rec.round,
            parent_hash=rec.parent_hash,
            updates=rec.updates,
            verdicts=rec.verdicts,
            created_at=rec.created_at,
            run=run,
        )
    elif isinstance(rec, RoundRec):
        await store.put_round(rec.round, rec.metrics, rec.model_hash, rec.closed_at, run=run)
    else:
        await store.save_checkpoint(rec.round, rec.state, rec.model_hash, run=run)


class RecordKeeper:
    """Models, rounds and checkpoints of ``run``: in memory, and with ``pg`` in the database,
    records waiting in order while it is unavailable. Not thread-safe: the caller locks."""

    def __init__(self, pg: PostgresSink | None, run: str) -> None:
        self.pg = pg
        self.run = run
        self.memory = Memory(model_limit=None if pg is None else CACHED_MODELS)
        self.pending: list[Rec] = []

    def drain(self) -> bool:
        """Write pending records in order; True once none are left. Non-transient errors raise."""
        pg = self.pg
        if pg is None:
            self.pending.clear()
            return True
        while self.pending:
            rec = self.pending[0]
            try:
                pg.call(functools.partial(_apply, rec=rec, run=self.run))
            except StoreUnavailable as exc:
                _log.warning("store unavailable, %d record(s) pending: %s", len(self.pending), exc)
                return False
            del self.pending[0]
        return True

    def add(self, rec: Rec) -> None:
        """Keep ``rec`` and write it (or queue it while the database is down)."""
        self.memory.add(rec)
        if self.pg is None:
            return
        if len(self.pending) >= MAX_PENDING_RECORDS:
            self.drain()
            if len(self.pending) >= MAX_PENDING_RECORDS:
                raise StoreBackpressure(
                    f"record buffer full ({len(self.pending)} pending while the database"
                    " is unavailable)"
                )
        self.pending.append(rec)
        self.drain()

    def _pending_of(self, kind: type[R]) -> list[R]:
        return [r for r in self.pending if isinstance(r, kind)]

    def get_model(self, model_hash: str) -> dict[str, Any] | None:
        for rec in reversed(self._pending_of(ModelRec)):
            if rec.model_hash == model_hash:
                return rec.full()
        pg = self.pg
        if pg is not None:
            try:
                stored = pg.call(lambda s: s.get_model(model_hash))
            except StoreUnavailable:
                _log.warning("store unavailable: get_model answered from memory")
            else:
                return None if stored is None else ModelRec.from_stored(stored).full()
        hit = self.memory.models.get(model_hash)
        return None if hit is None else hit.full()

    def models(self) -> list[dict[str, Any]]:
        run = self.run
        recs = list(self.memory.models.values())
        pg = self.pg
        if pg is not None:
            try:
                stored = pg.call(lambda s: s.models(run))
            except StoreUnavailable:
                _log.warning("store unavailable: models answered from memory")
            else:
                seen = {m.model_hash for m in stored}
                recs = [ModelRec.from_stored(m) for m in stored] + [
                    r for r in self._pending_of(ModelRec) if r.model_hash not in seen
                ]
        recs.sort(key=lambda r: (r.round, r.created_at))
        return [r.summary() for r in recs]

    def rounds(self) -> list[dict[str, Any]]:
        run = self.run
        by_round = dict(self.memory.rounds)
        pg = self.pg
        if pg is not None:
            try:
                stored = pg.call(lambda s: s.rounds(run))
            except StoreUnavailable:
                _log.warning("store unavailable: rounds answered from memory")
            else:
                by_round = {
                    r.round: RoundRec(r.round, r.metrics, r.model_hash, r.closed_at or 0.0)
                    for r in stored
                }
                by_round.update({r.round: r for r in self._pending_of(RoundRec)})
        return [by_round[k].as_dict() for k in sorted(by_round)]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        run = self.run
        pending = self._pending_of(CheckpointRec)
        if pending:
            return dict(pending[-1].as_dict())
        pg = self.pg
        if pg is not None:
            try:
                cp = pg.call(lambda s: s.latest_checkpoint(run))
            except StoreUnavailable:
                _log.warning("store unavailable: checkpoint answered from memory")
            else:
                if cp is None:
                    return None
                return CheckpointRec(cp.round, cp.state, cp.model_hash).as_dict()
        mem = self.memory.checkpoint
        return None if mem is None else mem.as_dict()
