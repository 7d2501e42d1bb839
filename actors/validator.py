"""The validator actor: judges every update and signs its verdicts to the coordinator.

Protocol checks run as each update arrives; verdicts go out as one signed batch per round
once every committed hospital has been judged, or shortly before the round's deadline, so a
missing hospital never holds the others' verdicts back. Anything judged after that batch
(late, replayed or forged traffic) is sent at once in a batch of its own.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import numpy as np
import structlog

from medimesh.actors import telemetry
from medimesh.actors.base import Node
from medimesh.aggregation import flatten
from medimesh.errors import EnvelopeError, MalformedPayload
from medimesh.protocol import RoundStart, Update, Verdict, Verdicts, VerdictsRequest, decode
from medimesh.reputation import Policy, Reputation, judge_round
from medimesh.scoring import Flag
from medimesh.secagg import SecAggError
from medimesh.secagg_round import round_params
from medimesh.validation import Decision, RoundContext, UpdateValidator
from medimesh.wire import digest, inspect, open_envelope

__all__ = ["Validator"]

DEADLINE_GRACE = 0.1  # fraction of the round timeout kept for the coordinator to close

log = structlog.get_logger("medimesh.validator")


class Validator(Node):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        max_norm: float = 50.0,
        scoring: bool = True,
        tolerate: int = 0,
    ) -> None:
        super().__init__(seed, roster_json, router, auditor)
        self._scoring = scoring
        # The declared tolerance is the validator's own configuration, never a message's.
        self._policy = Policy(tolerate=tolerate)
        self._reputation = self._restore()
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

    def _audit_verdict(self, d: Decision, flags: tuple[Flag, ...] = ()) -> None:
        """One verdict in the trail: who, accepted or not, why, and every flag with its score
        and threshold (flags of accepted updates too: evidence is never silent)."""
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
                "flags": [f.to_dict() for f in flags],
                "tolerate": self._policy.tolerate,
            },
        )

    def _score(self, batch: list[Decision]) -> list[Decision]:
        """Judge the round's protocol-clean updates against each other (medimesh.reputation).

        With f = 0 declared every flag is audited and nobody is excluded on statistics; with
        f > 0 at most f per round. Protocol refusals in ``batch`` stay as they are.
        """
        ctx = self._checker.context
        round_ = ctx.round if ctx is not None else -1
        first: dict[str, Decision] = {}
        for d in batch:  # one update per hospital (a retried round may hold two)
            if d.accepted and d.update is not None and d.hospital not in first:
                first[d.hospital] = d
        if not self._scoring or not first:
            for d in batch:
                if d.accepted:
                    self._audit_verdict(d)
            return batch
        vecs = {h: flatten(d.update.delta_w, d.update.delta_b)
                for h, d in first.items() if d.update is not None}  # (always set: typing)
        outcome = judge_round(
            self._reputation, self._policy, round_, vecs, list(first), self._reference
        )
        if round_ > self._reputation.round:  # late stragglers of a judged round: no new state
            self._reputation = outcome.state
            for event, hospital, body in outcome.events:
                self.audit.record(event, round_, hospital, body)
            self.audit.record("validator_state", round_, "", self._reputation.to_dict())
        out = []
        for d in batch:
            j = outcome.judgements.get(d.hospital)
            if d.accepted and j is not None:
                d = dataclasses.replace(
                    d, accepted=not j.excluded, reasons=j.reasons,
                    scores={**d.scores, **j.audit_scores()},
                )
                self._audit_verdict(d, j.flags)
            elif d.accepted:
                self._audit_verdict(d)
            out.append(d)
        return out

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

    def _restore(self) -> Reputation:
        """The standing this validator checkpointed in this run (after a restart), else empty.

        Only a ``validator_state`` entry signed by this validator's own key and newer than the
        run's ``setup_started`` counts: another run's or another signer's state is ignored.
        """
        import ray

        if self._auditor is None or not ray.get_runtime_context().was_current_actor_reconstructed:
            return Reputation()
        try:
            states = ray.get(self._auditor.entries.remote("validator_state", None, 50), timeout=30)
            starts = ray.get(self._auditor.entries.remote("setup_started", None, 1), timeout=30)
        except Exception as exc:  # the auditor is restarting: start empty, and say so
            log.warning("validator state not restored", error=type(exc).__name__)
            return Reputation()
        since = starts[-1].seq if starts else 0
        mine = [e for e in states if e.actor == self.peer_id and e.seq > since]
        if not mine:
            return Reputation()
        rep = Reputation.from_dict(mine[-1].body)
        self.audit.record("validator_restored", rep.round, "",
                          {"from_seq": mine[-1].seq, "quarantined": rep.quarantined})
        return rep

    def stats(self) -> dict[str, Any]:
        return {**self.verdicts, "quarantined": self._reputation.quarantined,
                "tolerate": self._policy.tolerate}
