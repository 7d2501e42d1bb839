"""Per-update honesty checks: the validator's decision logic, free of Ray and I/O.

Every check has a stable reason code so verdicts, audit entries and tests can name exactly
why an update was refused. The checks run cheapest-first and stop at the first protocol
failure; numeric checks run only on updates that decoded to the right shape and dtype.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from medimesh.errors import EnvelopeError, MalformedPayload, NotEnrolled
from medimesh.identity import Identity, Roster
from medimesh.protocol import SecAggMasked, Update, decode
from medimesh.secagg import SecAggError, SecAggParams, verify_masked
from medimesh.secagg_round import b64d
from medimesh.wire import Header, inspect, open_envelope
from medimesh.wire import digest as envelope_digest

__all__ = ["REASONS", "Decision", "RoundContext", "UpdateValidator"]

REASONS = {
    "bad_envelope": "the envelope failed parsing, signature or decryption",
    "not_enrolled": "the sender is not on the roster",
    "not_hospital": "the sender is enrolled, but not as a hospital",
    "wrong_type": "the message is not an update (a masked update in a secure round)",
    "no_round": "no round is open",
    "stale_round": "the update is for a round that is closed",
    "future_round": "the update is for a round that has not started",
    "wrong_base": "the update was trained on a different base model",
    "replay": "this message id was already seen",
    "duplicate": "this hospital already sent an update this round",
    "clock_skew": "the send time is outside the allowed clock-skew window",
    "malformed_payload": "the payload does not decode as an update",
    "wrong_shape": "the delta's shape does not match the model",
    "wrong_dtype": "the delta is not float32",
    "non_finite": "the delta holds NaN or Inf",
    "too_large": "the envelope exceeds the size bound",
    "norm_exceeded": "the delta's L2 norm exceeds the bound",
    "bad_example_count": "the example count is not positive or exceeds what was committed",
    "bad_masked_input": "the masked vector's length or its secure-aggregation signature is wrong",
    "norm_outlier": "the delta's norm is far from the round's (robust z-score)",
    "direction_outlier": "the delta points against the consensus direction",
    "distance_outlier": "the delta is far from the round's robust centre",
    "free_rider": "the delta is (nearly) zero: the hospital contributes nothing",
    "near_duplicate": "the delta nearly duplicates another hospital's (colluders)",
    "opposes_others": "the delta points against the other hospitals' mean while they agree",
    "quarantined": "earlier rounds flagged this hospital repeatedly; its updates are refused",
}


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What an update must agree with in the current round."""

    round: int
    base_hash: str
    n_features: int
    n_classes: int
    max_norm: float = 50.0
    max_bytes: int = 4 * 1024 * 1024
    max_skew_s: float = 300.0
    committed: dict[str, int] = field(default_factory=dict)
    # A secure round (docs/privacy.md §4): updates arrive masked; only protocol checks apply.
    secagg: SecAggParams | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict content before signing."""

    accepted: bool
    hospital: str
    digest: str
    reasons: tuple[str, ...]
    scores: dict[str, float]
    update: Update | None = None


class UpdateValidator:
    """Stateful per-round checker; remembers message ids to refuse replays."""

    def __init__(self, identity: Identity, roster: Roster, replay_memory: int = 100_000) -> None:
        self._identity = identity
        self._roster = roster
        self._ctx: RoundContext | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._senders: set[str] = set()
        self._memory = replay_memory

    @property
    def context(self) -> RoundContext | None:
        return self._ctx

    def begin_round(self, ctx: RoundContext) -> None:
        self._ctx = ctx
        self._senders = set()

    def _remember(self, message_id: str) -> bool:
        """True if the id is new; ids are kept across rounds up to a bounded memory."""
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > self._memory:
            self._seen.popitem(last=False)
        return True

    def check(self, envelope: bytes, now: float | None = None) -> Decision:

        dig = envelope_digest(envelope)
        try:
            header: Header = inspect(envelope)
        except EnvelopeError as exc:
            return Decision(False, "", dig, ("bad_envelope", type(exc).__name__), {})
        sender = header.sender
        try:
            self._roster.require(sender, "hospital")
        except NotEnrolled:
            reason = "not_hospital" if sender in self._roster else "not_enrolled"
            return Decision(False, sender, dig, (reason,), {})
        secure = self._ctx is not None and self._ctx.secagg is not None
        if header.type != (SecAggMasked.TYPE if secure else Update.TYPE):
            return Decision(False, sender, dig, ("wrong_type",), {})
        ctx = self._ctx
        if ctx is None:
            return Decision(False, sender, dig, ("no_round",), {})
        if not self._remember(header.message_id):
            return Decision(False, sender, dig, ("replay",), {})
        if header.round < ctx.round:
            return Decision(False, sender, dig, ("stale_round",), {})
        if header.round > ctx.round:
            return Decision(False, sender, dig, ("future_round",), {})
        t = time.time() if now is None else now
        if abs(t - header.sent_at) > ctx.max_skew_s:
            return Decision(False, sender, dig, ("clock_skew",), {})
        if len(envelope) > ctx.max_bytes:
            return Decision(False, sender, dig, ("too_large",), {"bytes": float(len(envelope))})
        if ctx.secagg is not None:
            return self._check_masked(envelope, header, dig, ctx, ctx.secagg)
        try:
            opened = open_envelope(envelope, self._identity)
            update = decode(header.type, opened.payload, Update)
        except EnvelopeError as exc:
            return Decision(False, sender, dig, ("bad_envelope", type(exc).__name__), {})
        except MalformedPayload:
            return Decision(False, sender, dig, ("malformed_payload",), {})
        if update.round != header.round:
            return Decision(False, sender, dig, ("malformed_payload",), {})
        if update.base_hash != ctx.base_hash:
            return Decision(False, sender, dig, ("wrong_base",), {})
        if sender in self._senders:
            return Decision(False, sender, dig, ("duplicate",), {})
        self._senders.add(sender)
        return self._numeric(update, sender, dig, ctx)

    def _check_masked(
        self, envelope: bytes, header: Header, dig: str, ctx: RoundContext, params: SecAggParams
    ) -> Decision:
        """A masked update: everything but its values (which look uniformly random here)."""
        sender = header.sender
        try:
            opened = open_envelope(envelope, self._identity)
            msg = decode(header.type, opened.payload, SecAggMasked)
        except EnvelopeError as exc:
            return Decision(False, sender, dig, ("bad_envelope", type(exc).__name__), {})
        except MalformedPayload:
            return Decision(False, sender, dig, ("malformed_payload",), {})
        if msg.round != header.round:
            return Decision(False, sender, dig, ("malformed_payload",), {})
        if msg.base_hash != ctx.base_hash:
            return Decision(False, sender, dig, ("wrong_base",), {})
        if sender in self._senders:
            return Decision(False, sender, dig, ("duplicate",), {})
        self._senders.add(sender)
        scores = {"n_examples": float(msg.n_examples)}
        try:
            if sender not in params.peers:
                raise SecAggError("sender is not in this round's aggregation")
            verify_masked(b64d(msg.masked), params, params.peers.index(sender) + 1)
        except (SecAggError, MalformedPayload):
            return Decision(False, sender, dig, ("bad_masked_input",), scores)
        limit = ctx.committed.get(sender)
        if msg.n_examples < 1 or (limit is not None and msg.n_examples > limit):
            return Decision(False, sender, dig, ("bad_example_count",), scores)
        return Decision(True, sender, dig, (), scores)

    @staticmethod
    def _numeric(update: Update, sender: str, dig: str, ctx: RoundContext) -> Decision:
        shape_ok = update.delta_w.shape == (ctx.n_features, ctx.n_classes) and (
            update.delta_b.shape == (ctx.n_classes,)
        )
        if not shape_ok:
            return Decision(False, sender, dig, ("wrong_shape",), {})
        if update.delta_w.dtype != np.float32 or update.delta_b.dtype != np.float32:
            return Decision(False, sender, dig, ("wrong_dtype",), {})
        if not (np.isfinite(update.delta_w).all() and np.isfinite(update.delta_b).all()):
            return Decision(False, sender, dig, ("non_finite",), {})
        norm = float(
            np.sqrt(
                np.sum(update.delta_w.astype(np.float64) ** 2)
                + np.sum(update.delta_b.astype(np.float64) ** 2)
            )
        )
        scores = {"norm": norm, "n_examples": float(update.n_examples)}
        if norm > ctx.max_norm:
            return Decision(False, sender, dig, ("norm_exceeded",), scores)
        limit = ctx.committed.get(sender)
        if update.n_examples < 1 or (limit is not None and update.n_examples > limit):
            return Decision(False, sender, dig, ("bad_example_count",), scores)
        return Decision(True, sender, dig, (), scores, update)
