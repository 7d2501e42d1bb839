"""Secure aggregation in the round path: protocol messages around :mod:`medimesh.secagg`.

:class:`SecAggHospital` (inside a hospital actor) and :class:`SecAggRound` (inside the
coordinator) turn the ``SecAgg*`` messages of :mod:`medimesh.protocol` into calls of
``SecAggClient`` / ``SecAggServer``. Both sides, and the validator, derive the round's
``SecAggParams`` from the signed RoundStart alone (:func:`round_params`), so they cannot
disagree on peers, threshold, range or context.

What a hospital masks is its clipped delta times ``n_i / N`` (its committed share of all
committed examples): the sum over every hospital is FedAvg's weighted mean, each summand stays
inside the quantizer's range ``[-C, C]``, and the coordinator rescales by ``N / sum n_i`` over
the hospitals actually included. It never holds one hospital's delta, only masked vectors.

Against a hostile coordinator (issue 15) the hospital side enforces its own
:class:`~medimesh.secagg_policy.SecAggPolicy` on every RoundStart, releases one masked input per
round (:class:`~medimesh.secagg_policy.MaskLedger`) and runs the consistency check before it
reveals any share; every refusal is a :class:`~medimesh.secagg_policy.SecAggRefused`, which the
actor audits as ``secagg_refused``. The coordinator side clamps the unmasked sum to the norm
honest inputs can reach (:func:`~medimesh.secagg_policy.bound_sum`).
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from medimesh.aggregation import flatten
from medimesh.errors import MalformedPayload
from medimesh.hospital import clip_delta
from medimesh.identity import Identity
from medimesh.protocol import (
    Message,
    RoundStart,
    SecAggAdvert,
    SecAggAdverts,
    SecAggCheck,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggMasked,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
    Update,
)
from medimesh.secagg import (
    Quantizer,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    check_advert,
    survivor_signers,
)
from medimesh.secagg_policy import MaskLedger, SecAggPolicy, SecAggRefused, SumCheck, bound_sum

__all__ = [
    "INBOUND",
    "SecAggHospital",
    "SecAggRound",
    "b64d",
    "b64e",
    "round_params",
    "weighted_vector",
]

# What hospitals send to the coordinator in a secure round.
INBOUND = frozenset(
    {SecAggAdvert.TYPE, SecAggShares.TYPE, SecAggMasked.TYPE, SecAggCheck.TYPE,
     SecAggUnmask.TYPE}
)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object) -> bytes:
    """Strict base64 decoding; anything else is a malformed payload, not a crash."""
    if not isinstance(text, str):
        raise MalformedPayload("secure-aggregation field is not base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedPayload("secure-aggregation field is not valid base64") from None


def round_params(start: RoundStart) -> SecAggParams:
    """The aggregation a RoundStart announces: peers in peer-id order, bound to the base
    model and to the attempt (its deadline), so a retried round's messages never mix."""
    peers = tuple(sorted(start.committed))
    dim = int(start.weights.size + start.bias.size)
    return SecAggParams(
        peers,
        start.secagg_threshold,
        dim,
        Quantizer(start.secagg_clip, len(peers)),
        start.round,
        start.base_hash.encode() + struct.pack(">d", start.deadline),
    )


def weighted_vector(update: Update, start: RoundStart, peer_id: str) -> np.ndarray:
    """The delta clipped to C, times the site's committed share of all committed examples."""
    dw, db = clip_delta(update.delta_w, update.delta_b, start.secagg_clip)
    total = sum(start.committed.values())
    share = start.committed[peer_id] / total if total > 0 else 0.0
    return flatten(dw.astype(np.float32), db.astype(np.float32)).astype(np.float64) * share


class SecAggHospital:
    """One hospital's side across a round's phases; fresh protocol state per RoundStart.

    ``policy``: the hospital's own rules (from its roster copy); None only for in-process
    tests, where the peer and threshold rules are skipped. The one-masked-input-per-round
    ledger and the consistency check always apply.
    """

    def __init__(self, identity: Identity, policy: SecAggPolicy | None = None) -> None:
        self._identity = identity
        self._policy = policy
        self._ledger = MaskLedger()
        self._client: SecAggClient | None = None
        self._vector: np.ndarray | None = None
        self._update: Update | None = None

    def params(self, round_: int) -> SecAggParams:
        """The open aggregation's parameters (for a drill that must sign as this hospital)."""
        return self._current(round_).params

    def admit(self, start: RoundStart) -> None:
        """Before any training: may this hospital answer ``start``? Else SecAggRefused."""
        if self._policy is not None:
            self._policy.check(start, self._identity.peer_id)
        if start.secagg_threshold:
            self._ledger.check(start.round, start.base_hash, start.committed)

    def _current(self, round_: int) -> SecAggClient:
        if self._client is None or self._client.params.round != round_:
            raise SecAggError(f"no secure aggregation open for round {round_}")
        return self._client

    def start(self, start: RoundStart, update: Update) -> SecAggAdvert:
        """Phase 0: keep the weighted delta here; advertise fresh keys."""
        self.admit(start)
        params = round_params(start)
        self._client = SecAggClient(params, self._identity)
        self._vector = weighted_vector(update, start, self._identity.peer_id)
        self._update = update
        return SecAggAdvert(start.round, b64e(self._client.advertise()))

    def on_adverts(self, msg: SecAggAdverts) -> SecAggShares:
        client = self._current(msg.round)
        sealed = client.share_keys(b64d(msg.adverts))
        peers = client.params.peers
        return SecAggShares(msg.round, {peers[v - 1]: b64e(ct) for v, ct in sealed.items()})

    def on_inbox(self, msg: SecAggInbox) -> SecAggMasked:
        client = self._current(msg.round)
        if self._vector is None or self._update is None:
            raise SecAggError("masked input already sent this round")
        peers = client.params.peers
        inbox = {}
        for sender, ct in msg.shares.items():
            if sender not in peers:
                raise SecAggError("shares from a hospital outside this aggregation")
            inbox[peers.index(sender) + 1] = b64d(ct)
        self._ledger.check(msg.round, self._update.base_hash, client.params.peers)
        masked = client.masked_input(self._vector, inbox)
        self._ledger.record(msg.round, self._update.base_hash)
        u = self._update
        self._vector = None  # the plaintext delta is not needed any more
        return SecAggMasked(msg.round, u.base_hash, u.n_examples, b64e(masked), dict(u.eval))

    def on_check_request(self, msg: SecAggCheckRequest) -> SecAggCheck:
        """Consistency check: sign the survivor list, and only one list per round."""
        client = self._current(msg.round)
        peers = client.params.peers
        if not set(msg.survivors) <= set(peers):
            raise SecAggRefused("survivors_not_peers", "survivor list names non-peers",
                                survivors=sorted(msg.survivors))
        alive = frozenset(peers.index(p) + 1 for p in msg.survivors)
        if client.signed is not None and client.signed != alive:
            raise SecAggRefused(
                "second_survivor_list", "already signed a different survivor list this round",
                survivors=sorted(msg.survivors), signed=sorted(peers[i - 1] for i in client.signed),
            )
        return SecAggCheck(msg.round, b64e(client.sign_survivors(sorted(alive))))

    def on_unmask_request(self, msg: SecAggUnmaskRequest) -> SecAggUnmask:
        """Reveal shares only for the list this hospital signed, with t valid signatures on
        it, and only once: never the self-mask share and the mask-key share of one peer."""
        client = self._current(msg.round)
        p = client.params
        peers = p.peers
        if not set(msg.survivors) <= set(peers):
            raise SecAggRefused("survivors_not_peers", "unmasking request names non-peers",
                                survivors=sorted(msg.survivors))
        alive = frozenset(peers.index(q) + 1 for q in msg.survivors)
        asked = {"survivors": sorted(msg.survivors)}
        if client.answered_for is not None:
            flipped = sorted(peers[i - 1] for i in client.answered_for ^ alive)
            raise SecAggRefused(
                "both_shares" if flipped else "already_answered",
                "a second unmasking request" + (
                    f" would reveal the other share of {len(flipped)} peer(s)" if flipped else ""
                ),
                both_kinds_for=flipped, **asked,
            )
        if client.signed is None:
            raise SecAggRefused("no_consistency_check",
                                "unmasking asked before the survivor list was signed", **asked)
        if client.signed != alive:
            raise SecAggRefused(
                "survivors_not_signed", "unmasking request names a list this hospital did not "
                "sign", signed=sorted(peers[i - 1] for i in client.signed), **asked,
            )
        sigs = {peers.index(q) + 1: b64d(sig) for q, sig in msg.signatures.items() if q in peers}
        good = survivor_signers(p, alive, sigs)
        if len(good) < p.threshold:
            raise SecAggRefused(
                "consistency_check_failed",
                f"{len(good)} valid signatures on the survivor list; {p.threshold} required",
                valid_signers=sorted(peers[i - 1] for i in good), threshold=p.threshold, **asked,
            )
        answer = client.unmask(sorted(alive), sigs)
        return SecAggUnmask(msg.round, b64e(answer))


@dataclass(slots=True)
class SecAggRound:
    """The coordinator's side of one round: what arrived in which phase, and the sum.

    Messages are accepted only in their phase and from the hospitals that phase expects;
    ``masked`` holds masked vectors (uniformly random to this side) and public counts.
    """

    params: SecAggParams
    committed: dict[str, int]
    server: SecAggServer
    phase: str = "advertise"
    adverts: dict[str, bytes] = field(default_factory=dict)
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)
    masked: dict[str, tuple[str, SecAggMasked]] = field(default_factory=dict)
    checks: dict[str, bytes] = field(default_factory=dict)
    answers: dict[str, bytes] = field(default_factory=dict)
    advertisers: tuple[str, ...] = ()
    u2: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()
    signers: tuple[str, ...] = ()
    sum_check: SumCheck | None = None

    @classmethod
    def begin(cls, start: RoundStart) -> SecAggRound:
        params = round_params(start)
        return cls(params, dict(start.committed), SecAggServer(params))

    def _index(self, peer: str) -> int:
        return self.params.peers.index(peer) + 1

    def add(self, sender: str, msg: Message, digest: str) -> bool:
        """Record a hospital's message; False if it is out of phase, round or turn."""
        if getattr(msg, "round", None) != self.params.round or sender not in self.params.peers:
            return False
        if isinstance(msg, SecAggAdvert) and self.phase == "advertise":
            advert = b64d(msg.advert)
            check_advert(advert, self.params, self._index(sender))
            self.adverts.setdefault(sender, advert)
        elif isinstance(msg, SecAggShares) and self.phase == "share_keys":
            if sender not in self.advertisers:
                return False
            sealed = {}
            for to, ct in msg.shares.items():
                if to not in self.advertisers:
                    raise SecAggError(f"shares addressed to {to[:12]}…, not an advertiser")
                sealed[to] = b64d(ct)
            self.shares.setdefault(sender, sealed)
        elif isinstance(msg, SecAggMasked) and self.phase == "masked_input":
            if sender not in self.u2:
                return False
            self.masked.setdefault(sender, (digest, msg))
        elif isinstance(msg, SecAggCheck) and self.phase == "check":
            if sender not in self.survivors:
                return False
            sig = b64d(msg.signature)
            alive = [self._index(p) for p in self.survivors]
            if not survivor_signers(self.params, alive, {self._index(sender): sig}):
                raise SecAggError(f"bad survivor-list signature from {sender[:12]}…")
            self.checks.setdefault(sender, sig)
        elif isinstance(msg, SecAggUnmask) and self.phase == "unmask":
            if sender not in self.signers:
                return False
            self.answers.setdefault(sender, b64d(msg.answer))
        else:
            return False
        return True

    def close_adverts(self) -> bytes:
        """Check every advertisement's signature; the blob goes back to all advertisers."""
        blob = self.server.collect_adverts({self._index(p): a for p, a in self.adverts.items()})
        self.advertisers = tuple(p for p in self.params.peers if p in self.adverts)
        self.phase = "share_keys"
        return blob

    def close_shares(self) -> dict[str, dict[str, str]]:
        """Each hospital's inbox of sealed shares (U2: the hospitals that shared keys)."""
        outs = {
            self._index(u): {self._index(v): ct for v, ct in sealed.items()}
            for u, sealed in self.shares.items()
        }
        inbox = self.server.route_shares(outs)
        peers = self.params.peers
        self.u2 = tuple(peers[v - 1] for v in sorted(inbox))
        self.phase = "masked_input"
        return {
            peers[v - 1]: {peers[u - 1]: b64e(ct) for u, ct in cts.items()}
            for v, cts in inbox.items()
        }

    def close_masked(self, accepted: set[str]) -> tuple[str, ...]:
        """Keep the masked vectors the validator accepted; their senders are U3 (whose list
        goes out next, to be signed: the consistency check)."""
        msgs = {
            self._index(p): b64d(m.masked) for p, (_, m) in self.masked.items() if p in accepted
        }
        if not msgs:
            raise SecAggError("no accepted masked vector")
        survivors = self.server.collect_masked(msgs)
        self.survivors = tuple(self.params.peers[i - 1] for i in survivors)
        self.phase = "check"
        return self.survivors

    def close_check(self) -> dict[str, str]:
        """The signatures over U3 (at least t); their signers (U4) are asked to unmask."""
        if len(self.checks) < self.params.threshold:
            raise SecAggError(
                f"only {len(self.checks)} survivors signed the list; need {self.params.threshold}"
            )
        self.signers = tuple(p for p in self.survivors if p in self.checks)
        self.phase = "unmask"
        return {p: b64e(self.checks[p]) for p in self.signers}

    def aggregate(self) -> np.ndarray:
        """FedAvg's example-weighted mean of the survivors' deltas, from their sum alone.

        The sum is checked against the norm honest inputs can reach and clamped to it
        (``sum_check``): a lying hospital cannot push the step beyond the clip norm.
        """
        total = self.server.unmask_sum({self._index(p): a for p, a in self.answers.items()})
        self.phase = "done"
        q = self.params.quantizer
        decoded, self.sum_check = bound_sum(
            self.server.decoded_sum(total), q.clip, self.committed, self.survivors,
            q.error_bound(len(self.survivors)),
        )
        n_all = sum(self.committed.values())
        n_in = sum(self.committed[p] for p in self.survivors)
        return np.asarray(decoded * (n_all / n_in))

    def held(self) -> Mapping[str, bytes]:
        """What this side holds per hospital: masked vectors, nothing else (for tests)."""
        return {p: b64d(m.masked) for p, (_, m) in self.masked.items()}
