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
)

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
    {SecAggAdvert.TYPE, SecAggShares.TYPE, SecAggMasked.TYPE, SecAggUnmask.TYPE}
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
    """One hospital's side across a round's four phases; fresh protocol state per RoundStart."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._client: SecAggClient | None = None
        self._vector: np.ndarray | None = None
        self._update: Update | None = None

    def _current(self, round_: int) -> SecAggClient:
        if self._client is None or self._client.params.round != round_:
            raise SecAggError(f"no secure aggregation open for round {round_}")
        return self._client

    def start(self, start: RoundStart, update: Update) -> SecAggAdvert:
        """Phase 0: keep the weighted delta here; advertise fresh keys."""
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
        masked = client.masked_input(self._vector, inbox)
        u = self._update
        self._vector = None  # the plaintext delta is not needed any more
        return SecAggMasked(msg.round, u.base_hash, u.n_examples, b64e(masked), dict(u.eval))

    def on_unmask_request(self, msg: SecAggUnmaskRequest) -> SecAggUnmask:
        client = self._current(msg.round)
        peers = client.params.peers
        if not set(msg.survivors) <= set(peers):
            raise SecAggError("unmasking request names hospitals outside this aggregation")
        answer = client.unmask([peers.index(p) + 1 for p in msg.survivors])
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
    answers: dict[str, bytes] = field(default_factory=dict)
    advertisers: tuple[str, ...] = ()
    u2: tuple[str, ...] = ()
    survivors: tuple[str, ...] = ()

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
        elif isinstance(msg, SecAggUnmask) and self.phase == "unmask":
            if sender not in self.survivors:
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
        """Keep the masked vectors the validator accepted; their senders are U3."""
        msgs = {
            self._index(p): b64d(m.masked) for p, (_, m) in self.masked.items() if p in accepted
        }
        if not msgs:
            raise SecAggError("no accepted masked vector")
        survivors = self.server.collect_masked(msgs)
        self.survivors = tuple(self.params.peers[i - 1] for i in survivors)
        self.phase = "unmask"
        return self.survivors

    def aggregate(self) -> np.ndarray:
        """FedAvg's example-weighted mean of the survivors' deltas, from their sum alone."""
        total = self.server.unmask_sum({self._index(p): a for p, a in self.answers.items()})
        self.phase = "done"
        decoded = self.server.decoded_sum(total)
        n_all = sum(self.committed.values())
        n_in = sum(self.committed[p] for p in self.survivors)
        return np.asarray(decoded * (n_all / n_in))

    def held(self) -> Mapping[str, bytes]:
        """What this side holds per hospital: masked vectors, nothing else (for tests)."""
        return {p: b64d(m.masked) for p, (_, m) in self.masked.items()}
