"""The validator actor: judges every update and signs its verdicts to the coordinator.

Protocol checks run as each update arrives; verdicts go out as one signed batch per round
once every committed hospital has been judged, or shortly before the round's deadline, so a
missing hospital never holds the others' verdicts back. Anything judged after that batch
(late, replayed or forged traffic) is sent at once in a batch of its own.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from medimesh.actors import telemetry
from medimesh.actors.base import Node
from medimesh.aggregation import flatten
from medimesh.errors import EnvelopeError, MalformedPayload
from medimesh.protocol import RoundStart, Update, Verdict, Verdicts, VerdictsRequest, decode
from medimesh.scoring import RoundScore, score_round
from medimesh.secagg import SecAggError
from medimesh.secagg_round import round_params
from medimesh.validation import Decision, RoundContext, UpdateValidator
from medimesh.wire import digest, inspect, open_envelope

__all__ = ["Validator"]

DEADLINE_GRACE = 0.1  # fraction of the round timeout kept for the coordinator to close
# Statistical rejections before a hospital is refused for the rest of the run. One: in our
# runs honest hospitals were never flagged (0 of 200 clean updates), while sign-flippers slip
# through once late rounds make honest updates near-orthogonal (docs/byzantine.md).
QUARANTINE_STRIKES = 1
# Median cosine of the round's updates to the last step below which direction is not judged.
CONSENSUS_MIN = 0.2


class Validator(Node):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        max_norm: float = 50.0,
        scoring: bool = True,
    ) -> None:
        super().__init__(seed, roster_json, router, auditor)
        self._scoring = scoring
        self._strikes: Counter[str] = Counter()
        self._quarantined: set[str] = set()
        self._base: np.ndarray | None = None
        self._reference: np.ndarray | None = None
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
        self._last_batch: tuple[int, bytes] | None = None

    def deliver(self, envelope: bytes) -> None:
        try:
            header = inspect(envelope)
        except EnvelopeError as exc:
            self.audit.record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return
        with self._lock:
            if header.type == RoundStart.TYPE and header.sender == self._coordinator:
                self._begin(envelope)
            elif header.type == VerdictsRequest.TYPE and header.sender == self._coordinator:
                self._resend(envelope)
            elif header.type == Update.TYPE or header.sender != self._coordinator:
                self._judge(envelope)
            self.maybe_flush()

    def _begin(self, envelope: bytes) -> None:
        try:
            opened = open_envelope(envelope, self.identity)
            msg = decode(opened.header.type, opened.payload, RoundStart)
            secagg = round_params(msg) if msg.secagg_threshold else None
        except (EnvelopeError, MalformedPayload, SecAggError) as exc:
            self.audit.record("round_start_refused", -1, "", {"reason": str(exc)})
            return
        if self._batch:
            self._send_batch()
        base = flatten(msg.weights, msg.bias)
        if self._base is not None and self._base.shape == base.shape:
            self._reference = base - self._base  # the step the consortium just took
        self._base = base
        n_features, n_classes = msg.weights.shape
        self._checker.begin_round(
            RoundContext(
                round=msg.round,
                base_hash=msg.base_hash,
                n_features=int(n_features),
                n_classes=int(n_classes),
                max_norm=self._max_norm,
                committed=dict(msg.committed),
                secagg=secagg,
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
        if not decision.accepted:
            self._audit_verdict(decision)  # protocol refusals are final at once
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

    def _audit_verdict(self, d: Decision) -> None:
        ctx = self._checker.context
        self.verdicts["accepted" if d.accepted else "rejected"] += 1
        self.audit.record(
            "verdict",
            ctx.round if ctx is not None else -1,
            d.digest,
            {
                "hospital": d.hospital,
                "accepted": d.accepted,
                "reasons": list(d.reasons),
                "scores": d.scores,
            },
        )

    def _score(self, batch: list[Decision]) -> list[Decision]:
        """Judge the round's protocol-clean updates against each other (outliers rejected)."""
        # Quarantined senders are refused anyway; kept out of the statistics, they cannot bend
        # the round's reference (or its consensus) against the honest sites.
        clean = [
            (d.digest, d.update) for d in batch
            if d.accepted and d.update is not None and d.hospital not in self._quarantined
        ]
        scored: dict[str, RoundScore] = {}
        if self._scoring and len(clean) >= 2:
            vecs = {dig: flatten(u.delta_w, u.delta_b) for dig, u in clean}
            weights = {dig: float(max(u.n_examples, 1)) for dig, u in clean}
            scored = score_round(vecs, weights, self._reference)
        # A direction outlier is evidence only when the round has a direction: late in training
        # honest non-IID updates are near-orthogonal and one of them may point "against" the
        # last step by chance (seen on the heart centers).
        cosines = [sc.cosine for sc in scored.values()]
        consensus = float(np.median(cosines)) if cosines else 0.0
        # Past round 1 the direction is judged against the step the consortium last took; a
        # restarted validator has not seen one yet, and the round's own median is no stand-in
        # late in training (honest updates cancel out): it judges direction again next round.
        ctx = self._checker.context
        blind = self._reference is None and ctx is not None and ctx.round > 1
        out = []
        for d in batch:
            if d.accepted:
                s = scored.get(d.digest)
                if s is not None:
                    reasons = s.reasons
                    if consensus < CONSENSUS_MIN or blind:
                        reasons = tuple(r for r in reasons if r != "direction_outlier")
                    extra = {  # undefined scores are left out: audit bodies are strict JSON
                        k: v
                        for k, v in (
                            ("norm_z", s.norm_z),
                            ("cosine", s.cosine),
                            ("distance_z", s.distance_z),
                            ("consensus", consensus),
                            ("loo_cosine", s.loo_cosine),
                            ("loo_consensus", s.loo_consensus),
                        )
                        if math.isfinite(v)
                    }
                    d = dataclasses.replace(
                        d, accepted=not reasons, reasons=reasons, scores={**d.scores, **extra}
                    )
                d = self._reputation(d)
                self._audit_verdict(d)
            out.append(d)
        return out

    def _reputation(self, d: Decision) -> Decision:
        """Strikes for statistical outliers; QUARANTINE_STRIKES of them quarantine a hospital.


        Early rounds separate attackers clearly (their updates oppose the consensus); late in
        training honest non-IID updates are nearly orthogonal and an attacker hides among them.
        Remembering who was caught early keeps a sign-flipper out for the rest of the run.
        """
        if d.hospital in self._quarantined:
            return dataclasses.replace(d, accepted=False, reasons=("quarantined",))
        if not d.accepted:
            self._strikes[d.hospital] += 1
            if self._strikes[d.hospital] >= QUARANTINE_STRIKES:
                self._quarantined.add(d.hospital)
                ctx = self._checker.context
                self.audit.record(
                    "hospital_quarantined",
                    ctx.round if ctx is not None else -1,
                    d.hospital,
                    {"strikes": self._strikes[d.hospital], "last_reasons": list(d.reasons)},
                )
        return d

    def _resend(self, envelope: bytes) -> None:
        """Send the round's signed batch again, byte for byte (the coordinator lost it)."""
        try:
            opened = open_envelope(envelope, self.identity)
            msg = decode(opened.header.type, opened.payload, VerdictsRequest)
        except (EnvelopeError, MalformedPayload):
            return
        if self._last_batch is not None and self._last_batch[0] == msg.round:
            self.transport.send(self._last_batch[1])
            self.audit.record("verdicts_resent", msg.round, digest(self._last_batch[1]), {})
        elif not self._flushed and self._batch:
            self._flushed = True  # not flushed yet: the coordinator's deadline came first
            self._send_batch()

    def _send_batch(self) -> None:
        ctx = self._checker.context
        round_ = ctx.round if ctx is not None else -1
        batch, self._batch = self._score(self._batch), []
        items = [
            Verdict(round_, d.digest, d.hospital, d.accepted, d.reasons, d.scores) for d in batch
        ]
        env = self.send(Verdicts(round_, items), [self._coordinator], round_)
        self._last_batch = (round_, env)
        self.audit.record("verdicts_sent", round_, digest(env), {"count": len(items)})
        # Counted here, where each verdict is final and sent once (not at the coordinator too).
        telemetry.record_verdicts((d.accepted, d.reasons) for d in batch)

    def stats(self) -> dict[str, Any]:
        return {**self.verdicts, "quarantined": sorted(self._quarantined)}
