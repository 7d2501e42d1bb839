"""The audit writer actor: sequences signed events into the hash chain and persists them.

It is also the one place that records models, rounds and checkpoints, so the rest of the
federation never talks to the database. With a ``database_url`` everything goes to PostgreSQL
through :class:`BufferedSink`; without one it lives in memory (or a JSONL file for the trail)
behind the same methods, so callers never branch. While the database is down, audit entries and
records wait in order in bounded buffers and are written on the next call or :meth:`flush`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from medimesh.identity import Identity, Roster
from medimesh.records import CheckpointRec, ModelRec, RecordKeeper, RoundRec, match, plain
from medimesh.runs import UNNAMED_RUN
from medimesh.store import BufferedSink, PostgresSink, Store, StoreError

__all__ = ["Auditor"]

_log = logging.getLogger(__name__)
_plain = plain  # the old name (tests and tools import it from here)


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
        else:
            self._sink = JsonlSink(Path(path)) if path else MemorySink()
            last = list(self._sink.entries())
            head = (last[-1].seq, last[-1].entry_hash) if last else (0, GENESIS)
        self._chain = AuditChain(self._identity, *head)
        self._records = RecordKeeper(self._pg, run_id)

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
            while drained and not self._records.drain():
                if time.monotonic() + 0.2 > deadline:
                    return False
                time.sleep(0.2)
            telemetry.record_backlog(self.backlog())
            return drained

    def backlog(self) -> int:
        """Entries plus records waiting for the database (always 0 without one)."""
        with self._lock:
            return (self._buffered.pending if self._buffered else 0) + len(self._records.pending)

    def head(self) -> tuple[int, str]:
        return self._chain.head

    def entries(
        self, event: str | None = None, round_: int | None = None, limit: int = 0
    ) -> list[AuditEntry]:
        """Matching entries in seq order; with ``limit``, only the newest ``limit`` of them."""
        with self._lock:
            if self._pg is not None and self._buffered is not None:
                self._buffered.flush(timeout=0)
                pending = [e for e in self._buffered.buffered() if match(e, event, round_)]
                pg = self._pg
                stored = pg.call(lambda s: s.tail(limit or 2**62, event=event, round=round_))
                last = stored[-1].seq if stored else 0
                rows = stored + [e for e in pending if e.seq > last]
            else:
                rows = [e for e in self._sink.entries() if match(e, event, round_)]
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

    def _record(self, rec: ModelRec | RoundRec | CheckpointRec) -> None:
        with self._lock:
            if self._closed:
                raise StoreError("the auditor is closed; the record was not stored")
            self._records.add(rec)
            if self._pg is not None:
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
        self._record(ModelRec.checked(
            model_hash, round_, parent_hash, weights, bias, updates, verdicts, time.time()
        ))

    def record_round(self, round_: int, metrics: dict[str, Any], model_hash: str) -> None:
        """Store a closed round's aggregate metrics (NaN becomes null) and resulting model."""
        self._record(RoundRec(int(round_), _plain(metrics), model_hash or None, time.time()))
        self.witness_head(int(round_))

    def save_checkpoint(self, round_: int, state: dict[str, Any], model_hash: str) -> None:
        """Save coordinator state so a restarted coordinator resumes at this round."""
        self._record(CheckpointRec(int(round_), _plain(state), model_hash or None))

    def get_model(self, model_hash: str) -> dict[str, Any] | None:
        """A model with weights, bias and provenance, or None if it was never recorded."""
        with self._lock:
            return self._records.get_model(model_hash)

    def models(self) -> list[dict[str, Any]]:
        """Every model this run recorded, oldest round first, without parameters."""
        with self._lock:
            return self._records.models()

    def rounds(self) -> list[dict[str, Any]]:
        """This run's recorded rounds: metrics and model hash, in round order."""
        with self._lock:
            return self._records.rounds()

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """This run's newest checkpoint ({"round", "state", "model_hash"}), or None."""
        with self._lock:
            return self._records.latest_checkpoint()

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
        """A remote node's ``audit_events`` via the router: chained if every check passes, else
        refused whole with the refusal chained (medimesh.audit_ingest)."""
        from medimesh.audit_ingest import ingest

        got = ingest(self._identity, {m.peer_id for m in self._roster}, envelope)
        if got.refused:
            _log.warning("audit events refused: %s", got.refused)
        if events := got.to_chain(self._identity):
            self.append(events)
