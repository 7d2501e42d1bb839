"""The validator actor: judges every update and signs its verdicts to the coordinator.

Protocol checks run as each update arrives; verdicts go out as one signed batch per round
once every committed hospital has been judged, or shortly before the round's deadline, so a
missing hospital never holds the others' verdicts back. Anything judged after that batch
(late, replayed or forged traffic) is sent at once in a batch of its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from medimesh.actors.base import Node
from medimesh.errors import EnvelopeError, MalformedPayload
from medimesh.protocol import RoundStart, Update, Verdict, Verdicts, decode
from medimesh.validation import Decision, RoundContext, UpdateValidator
from medimesh.wire import digest, inspect, open_envelope

__all__ = ["Validator"]

DEADLINE_GRACE = 0.1  # fraction of the round timeout kept for the coordinator to close


class Validator(Node):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        max_norm: float = 50.0,
    ) -> None:
        super().__init__(seed, roster_json, router, auditor)
        self._checker = UpdateValidator(self.identity, self.roster)
        self._coordinator = self.roster.with_role("coordinator")[0].peer_id
        self._max_norm = max_norm
        self._batch: list[Decision] = []
        self._expected: set[str] = set()
        self._judged: set[str] = set()
        self._flushed = True
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()  # the deadline timer thread flushes too
        self.verdicts = {"accepted": 0, "rejected": 0}

    def deliver(self, envelope: bytes) -> None:
        try:
            header = inspect(envelope)
        except EnvelopeError as exc:
            self.audit.record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return
        with self._lock:
            if header.type == RoundStart.TYPE and header.sender == self._coordinator:
                self._begin(envelope)
            elif header.type == Update.TYPE or header.sender != self._coordinator:
                self._judge(envelope)
            self.maybe_flush()

    def _begin(self, envelope: bytes) -> None:
        try:
            opened = open_envelope(envelope, self.identity)
            msg = decode(opened.header.type, opened.payload, RoundStart)
        except (EnvelopeError, MalformedPayload) as exc:
            self.audit.record("round_start_refused", -1, "", {"reason": str(exc)})
            return
        if self._batch:
            self._send_batch()
        n_features, n_classes = msg.weights.shape
        self._checker.begin_round(
            RoundContext(
                round=msg.round,
                base_hash=msg.base_hash,
                n_features=int(n_features),
                n_classes=int(n_classes),
                max_norm=self._max_norm,
                committed=dict(msg.committed),
            )
        )
        self._expected = set(msg.committed)
        self._judged = set()
        self._flushed = False
        if self._timer is not None:
            self._timer.cancel()
        wait = (msg.deadline - time.time()) * (1 - DEADLINE_GRACE)
        self._timer = threading.Timer(max(wait, 0.0), self._flush)
        self._timer.daemon = True
        self._timer.start()

    def _judge(self, envelope: bytes) -> None:
        decision = self._checker.check(envelope)
        ctx = self._checker.context
        self.verdicts["accepted" if decision.accepted else "rejected"] += 1
        self.audit.record(
            "verdict",
            ctx.round if ctx is not None else -1,
            decision.digest,
            {
                "hospital": decision.hospital,
                "accepted": decision.accepted,
                "reasons": list(decision.reasons),
                "scores": decision.scores,
            },
        )
        self._batch.append(decision)
        if decision.hospital in self._expected:
            self._judged.add(decision.hospital)
        if self._flushed or self._judged >= self._expected:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            self._flushed = True
            if self._batch:
                self._send_batch()

    def _send_batch(self) -> None:
        ctx = self._checker.context
        round_ = ctx.round if ctx is not None else -1
        batch, self._batch = self._batch, []
        items = [
            Verdict(round_, d.digest, d.hospital, d.accepted, d.reasons, d.scores) for d in batch
        ]
        env = self.send(Verdicts(round_, items), [self._coordinator], round_)
        self.audit.record("verdicts_sent", round_, digest(env), {"count": len(items)})

    def stats(self) -> dict[str, int]:
        return dict(self.verdicts)
