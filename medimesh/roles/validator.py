"""The validator's protocol as a sans-IO state machine: envelopes and the clock in, effects out.

:class:`ValidatorRole` judges every update and signs its verdicts to the coordinator. Protocol
checks (medimesh.validation) run as each update arrives, and a refusal is audited at once.
Verdicts go out as one signed batch per round, after the round's protocol-clean updates were
scored against each other (medimesh.reputation), once every committed hospital has been judged
or shortly before the round's deadline, so a missing hospital never holds the others' verdicts
back. Anything judged after that batch (late, replayed or forged traffic) goes out at once in
a batch of its own. A coordinator that lost a batch asks again (VerdictsRequest) and gets the
same signed bytes.

It never sends, sleeps or reads a clock: its shell (the Ray actor
``medimesh.actors.validator``, or a node process) drives it so:

* ``restore(saved, since_seq)`` once, after a restart, with the ``STATE_EVENT`` entries the
  shell read back from the audit trail (and the sequence number where this run began);
* ``receive(envelope, now)`` for every envelope that arrives;
* ``tick(now)`` when ``deadline`` passes (None: nothing to wait for).

Every call returns the effects to carry out, in order: Record and SendRaw (medimesh.roles;
the role seals its verdict batches itself, so a resend is byte for byte) and
:class:`CountVerdicts` (the shell's metrics). The role never sees a patient row: deltas and
example counts are all an update holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from medimesh.aggregation import flatten
from medimesh.audit import AuditEntry
from medimesh.errors import EnvelopeError, MalformedPayload
from medimesh.identity import Identity, Roster
from medimesh.protocol import RoundStart, Update, Verdict, Verdicts, VerdictsRequest, decode
from medimesh.reputation import Policy, Reputation, judge_round
from medimesh.roles import Effect, Record, SendRaw
from medimesh.scoring import Flag
from medimesh.secagg import SecAggError
from medimesh.secagg_round import round_params
from medimesh.validation import Decision, RoundContext, UpdateValidator
from medimesh.wire import digest, inspect, open_envelope, seal

__all__ = ["DEADLINE_GRACE", "STATE_EVENT", "CountVerdicts", "ValidatorEffect", "ValidatorRole"]

DEADLINE_GRACE = 0.1  # fraction of the round timeout kept for the coordinator to close
STATE_EVENT = "validator_state"  # the audit event that checkpoints the reputation


@dataclass(frozen=True, slots=True)
class CountVerdicts:
    """A batch of verdicts was just sent: count each once, as (accepted, reasons)."""

    verdicts: tuple[tuple[bool, tuple[str, ...]], ...]


ValidatorEffect = Effect | CountVerdicts


class ValidatorRole:
    """One validator's protocol state (see the module docstring for how to drive it).

    ``max_norm``: the L2 bound on a delta. ``scoring``: judge the round's clean updates against
    each other (False: protocol checks only). ``tolerate``: the declared f, the validator's
    own configuration, never a message's. ``reputation``: a standing to start from.
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        max_norm: float = 50.0,
        scoring: bool = True,
        tolerate: int = 0,
        reputation: Reputation | None = None,
    ) -> None:
        self.identity = identity
        self.roster = roster
        self.policy = Policy(tolerate=tolerate)
        self.reputation = reputation if reputation is not None else Reputation()
        self.coordinator = roster.with_role("coordinator")[0].peer_id
        self._scoring = scoring
        self._max_norm = max_norm
        self._checker = UpdateValidator(identity, roster)
        self._base: np.ndarray | None = None
        self._reference: np.ndarray | None = None  # the step the consortium just took
        self._batch: list[Decision] = []
        self._expected: set[str] = set()
        self._judged: set[str] = set()
        self._flushed = True
        self._flush_at: float | None = None
        self._last_batch: tuple[int, bytes] | None = None  # (round, sealed Verdicts)
        self.verdicts = {"accepted": 0, "rejected": 0}
        self._out: list[ValidatorEffect] = []

    # -- driving ---------------------------------------------------------------------------
    @property
    def deadline(self) -> float | None:
        """When ``tick`` must be called even if nothing arrives (None: no batch is due)."""
        return None if self._flushed else self._flush_at

    @property
    def round(self) -> int:
        ctx = self._checker.context
        return ctx.round if ctx is not None else -1

    def tick(self, now: float) -> list[ValidatorEffect]:
        """Send the round's batch if its time came (shortly before the round's deadline)."""
        if not self._flushed and self._flush_at is not None and now >= self._flush_at:
            self._flush(now)
        return self._take()

    def receive(self, envelope: bytes, now: float) -> list[ValidatorEffect]:
        """Take in one envelope: a round start or a resend request from the coordinator, or
        anything else, judged as an update (a forged RoundStart is refused on opening)."""
        try:
            header = inspect(envelope)
        except EnvelopeError as exc:
            self._record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return self._take()
        from_coordinator = header.sender == self.coordinator
        if header.type == RoundStart.TYPE and from_coordinator:
            self._begin(envelope, now)
        elif header.type == VerdictsRequest.TYPE and from_coordinator:
            self._resend(envelope, now)
        elif header.type == Update.TYPE or not from_coordinator:
            self._judge(envelope, now)
        return self._take()

    def restore(self, saved: Iterable[AuditEntry], since_seq: int) -> list[ValidatorEffect]:
        """Take back the standing this validator checkpointed in this run (after a restart).

        Only a ``STATE_EVENT`` entry signed by this validator's own key and newer than
        ``since_seq`` (the run's ``setup_started``) counts: another run's or another signer's
        state is ignored.
        """
        mine = [e for e in saved if e.event == STATE_EVENT and e.actor == self.identity.peer_id
                and e.seq > since_seq]
        if not mine:
            return []
        latest = max(mine, key=lambda e: e.seq)
        self.reputation = Reputation.from_dict(latest.body)
        self._record("validator_restored", self.reputation.round, "",
                     {"from_seq": latest.seq, "quarantined": self.reputation.quarantined})
        return self._take()

    def stats(self) -> dict[str, object]:
        return {**self.verdicts, "quarantined": self.reputation.quarantined,
                "tolerate": self.policy.tolerate}

    # -- internals ---------------------------------------------------------------------------
    def _take(self) -> list[ValidatorEffect]:
        out, self._out = self._out, []
        return out

    def _record(self, event: str, round_: int, subject: str, body: dict[str, object]) -> None:
        self._out.append(Record(event, round_, subject, body))

    def _begin(self, envelope: bytes, now: float) -> None:
        try:
            opened = open_envelope(envelope, self.identity)
            msg = decode(opened.header.type, opened.payload, RoundStart)
            secagg = round_params(msg) if msg.secagg_threshold else None
        except (EnvelopeError, MalformedPayload, SecAggError) as exc:
            self._record("round_start_refused", -1, "", {"reason": str(exc)})
            return
        if self._batch:  # the previous round's stragglers, under that round's number
            self._send_batch(now)
        base = flatten(msg.weights, msg.bias)
        if self._base is not None and self._base.shape == base.shape:
            self._reference = base - self._base
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
        self._flush_at = now + max(msg.deadline - now, 0.0) * (1 - DEADLINE_GRACE)

    def _judge(self, envelope: bytes, now: float) -> None:
        decision = self._checker.check(envelope, now)
        if not decision.accepted:
            self._audit_verdict(decision)  # protocol refusals are final at once
        self._batch.append(decision)
        if decision.hospital in self._expected:
            self._judged.add(decision.hospital)
        if self._flushed or self._judged >= self._expected:
            self._flush(now)

    def _flush(self, now: float) -> None:
        self._flushed = True
        if self._batch:
            self._send_batch(now)

    def _resend(self, envelope: bytes, now: float) -> None:
        """Send the round's signed batch again, byte for byte (the coordinator lost it)."""
        try:
            opened = open_envelope(envelope, self.identity)
            msg = decode(opened.header.type, opened.payload, VerdictsRequest)
        except (EnvelopeError, MalformedPayload):
            return
        if self._last_batch is not None and self._last_batch[0] == msg.round:
            self._out.append(SendRaw(self._last_batch[1]))
            self._record("verdicts_resent", msg.round, digest(self._last_batch[1]), {})
        elif not self._flushed and self._batch:
            self._flush(now)  # not flushed yet: the coordinator's deadline came first

    def _audit_verdict(self, d: Decision, flags: tuple[Flag, ...] = ()) -> None:
        """One verdict in the trail: who, accepted or not, why, and every flag with its score
        and threshold (flags of accepted updates too: evidence is never silent)."""
        self.verdicts["accepted" if d.accepted else "rejected"] += 1
        self._record("verdict", self.round, d.digest, {
            "hospital": d.hospital,
            "accepted": d.accepted,
            "reasons": list(d.reasons),
            "scores": d.scores,
            "flags": [f.to_dict() for f in flags],
            "tolerate": self.policy.tolerate,
        })

    def _score(self, batch: list[Decision]) -> list[Decision]:
        """Judge the round's protocol-clean updates against each other (medimesh.reputation).

        With f = 0 declared every flag is audited and nobody is excluded on statistics; with
        f > 0 at most f per round. Protocol refusals in ``batch`` stay as they are.
        """
        round_ = self.round
        first: dict[str, Update] = {}
        for d in batch:  # one update per hospital (a retried round may hold two)
            if d.accepted and d.update is not None and d.hospital not in first:
                first[d.hospital] = d.update
        if not self._scoring or not first:
            for d in batch:
                if d.accepted:
                    self._audit_verdict(d)
            return batch
        vecs = {h: flatten(u.delta_w, u.delta_b) for h, u in first.items()}
        outcome = judge_round(
            self.reputation, self.policy, round_, vecs, list(first), self._reference
        )
        if round_ > self.reputation.round:  # late stragglers of a judged round: no new state
            self.reputation = outcome.state
            for event, hospital, body in outcome.events:
                self._record(event, round_, hospital, body)
            self._record(STATE_EVENT, round_, "", self.reputation.to_dict())
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

    def _send_batch(self, now: float) -> None:
        """Score, sign and seal the batch to the coordinator; keep the bytes for a resend."""
        round_ = self.round
        batch, self._batch = self._score(self._batch), []
        items = [
            Verdict(round_, d.digest, d.hospital, d.accepted, d.reasons, d.scores) for d in batch
        ]
        msg = Verdicts(round_, items)
        env = seal(self.identity, msg.TYPE, [self.coordinator], round_, msg.to_payload(),
                   now=now)
        self._last_batch = (round_, env)
        self._out.append(SendRaw(env))
        self._record("verdicts_sent", round_, digest(env), {"count": len(items)})
        # Counted here, where each verdict is final and sent once (not at the coordinator too).
        self._out.append(CountVerdicts(tuple((d.accepted, d.reasons) for d in batch)))
