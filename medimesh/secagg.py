"""Secure aggregation: pairwise + self masking with Shamir recovery (Bonawitz et al. 2017).

The coordinator learns only the *sum* of the hospitals' vectors. Every hospital ``u``
quantizes its vector to integers mod 2^32 and adds masks that cancel in the sum:

    y_u = q(x_u) + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)   (mod 2^32)

- ``s_uv`` is the X25519 agreement of u's and v's per-round mask keys, hashed with the round
  context (BLAKE2b); ``PRG`` is the ChaCha20 key stream (``cryptography``), never numpy's RNG.
- ``b_u`` is a fresh 32-byte self-mask seed ("double masking"): if u's masked vector arrives
  late, after the others' pairwise masks were recovered, it is still hidden by ``PRG(b_u)``.
- u Shamir-shares (``medimesh.shamir``, threshold ``t``) its mask private key and ``b_u`` to
  the others, encrypted with an X25519 Box under a second per-round key. In the unmasking
  round each survivor reveals, for every other hospital, *either* its share of ``b`` (the
  hospital sent its masked vector) *or* its share of the mask key (it dropped before sending
  it), never both, so the coordinator can remove the masks of every dropout as long as ``t``
  hospitals answer, and learns no individual vector. ``t > n/2`` is enforced.
- Quantization (:class:`Quantizer`): each coordinate is clipped to ``[-R, R]`` and mapped to
  ``round((x + R) * s)`` with ``s = (2^b - 1) / 2R`` and ``b = 32 - ceil(log2 n_max)`` bits,
  so the sum of up to ``n_max`` values never wraps. **Error bound**: for inputs inside the
  range, every coordinate of the decoded sum of ``n`` vectors is within ``n / (2 s)`` of the
  exact sum (each rounding moves a value by at most half a step).
- Advertisements, masked vectors and unmasking answers are signed with the hospital's Ed25519
  identity; advertisements also carry a hash commitment to ``b_u``, so a reconstructed seed
  (and, via its public key, a reconstructed mask key) is checked before it is used.

- Consistency check (the actively secure variant): before unmasking, every survivor signs the
  survivor list U3 it was shown (:meth:`SecAggClient.sign_survivors`) and reveals shares only
  for that list, and only when at least ``t`` survivors' signatures over it verify
  (:func:`survivor_signers`), so a server cannot show two groups of hospitals two lists.

Threat model: a malicious coordinator colluding with fewer than ``2t - n`` hospitals, if every
hospital also enforces its own policy (:mod:`medimesh.secagg_policy`; docs/privacy.md).
All of this is pure logic on bytes; :func:`run_protocol` drives all rounds in process
(the benchmark and the tests use it with real keys and real ciphers).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from nacl.bindings import crypto_scalarmult
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from medimesh import shamir
from medimesh.errors import ConfigError, MediMeshError
from medimesh.identity import Identity, verify_key

__all__ = [
    "MODULUS_BITS",
    "Quantizer",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "check_advert",
    "masked_size",
    "prg",
    "run_protocol",
    "sign_survivors",
    "survivor_signers",
    "verify_masked",
]

MODULUS_BITS = 32
_ADVERT = b"medimesh/secagg/advert/v1\0"
_MASKED = b"medimesh/secagg/masked/v1\0"
_UNMASK = b"medimesh/secagg/unmask/v1\0"
_CHECK = b"medimesh/secagg/consistency/v1\0"
_PERSON = b"medimesh-secagg1"  # BLAKE2b personalisation (16 bytes): domain separation
_B_SHARE, _S_SHARE = 0, 1


class SecAggError(MediMeshError):
    """The protocol cannot finish: too few survivors, a bad signature or share, a bad size."""


# ------------------------------------------------------------------------------- quantization


@dataclass(frozen=True, slots=True)
class Quantizer:
    """Fixed-point encoding of [-clip, clip] into ``bits`` bits, summable without wrap-around."""

    clip: float
    max_summands: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError("quantizer range must be positive and finite")
        if not 1 <= self.max_summands <= 1 << 16:
            raise SecAggError("quantizer supports 1 to 65536 summands")

    @property
    def bits(self) -> int:
        return MODULUS_BITS - math.ceil(math.log2(self.max_summands))

    @property
    def scale(self) -> float:
        return float((1 << self.bits) - 1) / (2.0 * self.clip)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Clip to [-R, R], shift and round: uint32 in [0, 2^bits - 1]."""
        v = np.clip(np.asarray(x, dtype=np.float64).ravel(), -self.clip, self.clip)
        return np.rint((v + self.clip) * self.scale).astype(np.uint32)

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum of ``count`` encoded vectors from their (unwrapped) integer sum."""
        if not 0 <= count <= self.max_summands:
            raise SecAggError(f"{count} summands exceed the quantizer's {self.max_summands}")
        return np.asarray(total, dtype=np.float64) / self.scale - count * self.clip

    def error_bound(self, count: int) -> float:
        """Max per-coordinate |decoded sum - exact sum| for ``count`` in-range vectors.

        n half-steps of rounding, plus float64 slack far below one step.
        """
        return count * (0.5 + 1e-6) / self.scale


# ---------------------------------------------------------------------------- primitives


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of the ChaCha20 key stream under a 32-byte ``seed``.

    Each seed is used once (it is derived per round and per pair), so a zero nonce is safe.
    """
    if len(seed) != 32:
        raise SecAggError("a mask seed is 32 bytes")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    stream = enc.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _kdf(label: bytes, context: bytes, key: bytes) -> bytes:
    return hashlib.blake2b(label + b"\0" + context + key, digest_size=32, person=_PERSON).digest()


def _agree(secret: bytes, public: bytes, context: bytes) -> bytes:
    """The pair's mask seed: X25519 shared point, hashed with the round context."""
    try:
        shared = crypto_scalarmult(secret, public)
    except (CryptoError, ValueError) as exc:
        raise SecAggError(f"key agreement failed: {exc}") from None
    return _kdf(b"pair", context, shared)


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class SecAggParams:
    """One aggregation: who takes part (peer ids, index = position + 1), what, how robust."""

    peers: tuple[str, ...]
    threshold: int
    dim: int
    quantizer: Quantizer
    round: int = 0
    session: bytes = b""

    def __post_init__(self) -> None:
        n = len(self.peers)
        if n < 2 or len(set(self.peers)) != n:
            raise SecAggError("secure aggregation needs at least two distinct hospitals")
        if not n // 2 < self.threshold <= n:
            raise SecAggError(f"threshold must satisfy n/2 < t <= n; got t={self.threshold}, n={n}")
        if self.dim < 1:
            raise SecAggError("vectors need at least one coordinate")
        if self.quantizer.max_summands < n:
            raise SecAggError("the quantizer must allow one summand per hospital")

    @classmethod
    def for_dropout(
        cls,
        peers: Sequence[str],
        max_dropout: float,
        dim: int,
        clip: float,
        round_: int = 0,
        session: bytes = b"",
    ) -> SecAggParams:
        """Threshold ``t = n - floor(max_dropout * n)``: that many dropouts are survivable."""
        n = len(peers)
        if not 0 <= max_dropout < 0.5:
            raise SecAggError("max dropout fraction must be in [0, 0.5) (t > n/2)")
        t = n - math.floor(max_dropout * n + 1e-9)
        return cls(tuple(peers), t, dim, Quantizer(clip, n), round_, session)

    @property
    def n(self) -> int:
        return len(self.peers)

    @property
    def context(self) -> bytes:
        return struct.pack(">I", self.round) + hashlib.sha256(
            self.session + b"".join(p.encode() for p in self.peers)
        ).digest()


@dataclass(frozen=True, slots=True)
class SecAggConfig:
    """Secure aggregation in the actors' round path (``RunConfig.secure_aggregation``).

    ``max_dropout``: fraction of a round's hospitals that may vanish (t = n - floor(f*n)),
    below 1/3 because hospitals require t > 2n/3 (medimesh.secagg_policy).
    ``clip_norm``: every hospital clips its delta to this L2 norm, which is also the
    quantizer's per-coordinate range R, so encoding never saturates an honest update.
    ``grace_s``: once t hospitals answered a phase, how long to wait for the rest.
    ``phase_timeout_s``: the most any phase after the first (training) may take.
    """

    max_dropout: float = 0.3
    clip_norm: float = 5.0
    grace_s: float = 2.0
    phase_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_dropout < 1 / 3:
            # Hospitals refuse t <= 2n/3 (medimesh.secagg_policy): never propose it.
            raise ConfigError("secure aggregation: max dropout must be in [0, 1/3) (t > 2n/3)")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError("secure aggregation: clip norm must be positive and finite")
        if self.grace_s < 0 or self.phase_timeout_s <= 0:
            raise ConfigError("secure aggregation: grace >= 0 and phase timeout > 0 seconds")

    def threshold(self, n: int) -> int:
        return n - math.floor(self.max_dropout * n + 1e-9)


# ---------------------------------------------------------------------------- wire formats

_ADV = struct.Struct(">IH32s32s32s")  # round, index, share key, mask key, commit(b)
_ADV_SIZE = _ADV.size + 64
_SHARE_PLAIN = struct.Struct(f">IHH{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
_HEAD = struct.Struct(">IHI")  # round, index, count (dim or entries)
_ENTRY = struct.Struct(f">HB{shamir.SHARE_BYTES}s")


@dataclass(frozen=True, slots=True)
class _Advert:
    index: int
    share_pk: bytes
    mask_pk: bytes
    commit_b: bytes


def _parse_adverts(blob: bytes, params: SecAggParams) -> dict[int, _Advert]:
    """Verify every advertisement's signature against its hospital's roster key."""
    if len(blob) % _ADV_SIZE:
        raise SecAggError("advertisement list has a bad length")
    out: dict[int, _Advert] = {}
    for off in range(0, len(blob), _ADV_SIZE):
        body, sig = blob[off : off + _ADV.size], blob[off + _ADV.size : off + _ADV_SIZE]
        rnd, idx, spk, mpk, commit = _ADV.unpack(body)
        if rnd != params.round or not 1 <= idx <= params.n or idx in out:
            raise SecAggError("advertisement for another round, an unknown or a repeated index")
        try:
            verify_key(params.peers[idx - 1]).verify(_ADVERT + params.context + body, sig)
        except BadSignatureError:
            raise SecAggError(f"advertisement of hospital {idx} has a bad signature") from None
        out[idx] = _Advert(idx, spk, mpk, commit)
    return out


def _signed_head(
    identity: Identity, domain: bytes, params: SecAggParams, index: int, count: int, body: bytes
) -> bytes:
    head = _HEAD.pack(params.round, index, count)
    return head + body + identity.sign(domain + params.context + head + body)


def _open_signed(
    msg: bytes, domain: bytes, params: SecAggParams, sender: int
) -> tuple[int, bytes]:
    """(count, body) of a message signed by hospital ``sender`` for this round."""
    if len(msg) < _HEAD.size + 64:
        raise SecAggError("message too short")
    head, body, sig = msg[: _HEAD.size], msg[_HEAD.size : -64], msg[-64:]
    rnd, idx, count = _HEAD.unpack(head)
    if rnd != params.round or idx != sender:
        raise SecAggError(f"message from hospital {sender} names round {rnd}, index {idx}")
    try:
        verify_key(params.peers[sender - 1]).verify(domain + params.context + head + body, sig)
    except BadSignatureError:
        raise SecAggError(f"message of hospital {sender} has a bad signature") from None
    return count, body


def check_advert(advert: bytes, params: SecAggParams, sender: int) -> None:
    """One advertisement, as it arrives: signed by hospital ``sender`` for this context.

    Checked on arrival so that a stale one (a retried round's earlier attempt) is refused
    alone instead of failing the whole list later.
    """
    parsed = _parse_adverts(advert, params)
    if list(parsed) != [sender]:
        raise SecAggError(f"advertisement of hospital {sender} names another index")


def masked_size(dim: int) -> int:
    """Bytes of one signed masked vector of ``dim`` values (head, body, signature)."""
    return _HEAD.size + 4 * dim + 64


def verify_masked(msg: bytes, params: SecAggParams, sender: int) -> None:
    """Check a masked vector's size and its sender's signature without unmasking anything.

    What a validator can still check in a secure round: the vector is the hospital's own,
    for this round's context, and has exactly the model's length.
    """
    if len(msg) != masked_size(params.dim):
        raise SecAggError(f"masked vector of hospital {sender} has the wrong size")
    count, _ = _open_signed(msg, _MASKED, params, sender)
    if count != params.dim:
        raise SecAggError(f"masked vector of hospital {sender} names the wrong length")


def _survivor_list(survivors: Iterable[int]) -> bytes:
    idx = sorted(set(survivors))
    return struct.pack(f">{len(idx)}H", *idx)


def sign_survivors(identity: Identity, params: SecAggParams, survivors: Iterable[int]) -> bytes:
    """A hospital's signature over the survivor list U3 of this aggregation (its context)."""
    return identity.sign(_CHECK + params.context + _survivor_list(survivors))


def survivor_signers(
    params: SecAggParams, survivors: Iterable[int], signatures: Mapping[int, bytes]
) -> frozenset[int]:
    """The members of ``survivors`` whose signature over exactly this list verifies."""
    alive = frozenset(survivors)
    signed = _CHECK + params.context + _survivor_list(alive)
    good = set()
    for v, sig in signatures.items():
        if v not in alive or not 1 <= v <= params.n or len(sig) != 64:
            continue
        try:
            verify_key(params.peers[v - 1]).verify(signed, sig)
        except BadSignatureError:
            continue
        good.add(v)
    return frozenset(good)


# ---------------------------------------------------------------------------- the hospital


class SecAggClient:
    """One hospital's side of one aggregation. Fresh keys per round; nothing reused."""

    def __init__(
        self,
        params: SecAggParams,
        identity: Identity,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if identity.peer_id not in params.peers:
            raise SecAggError("this hospital is not among the aggregation's peers")
        self.params = params
        self.index = params.peers.index(identity.peer_id) + 1
        self._identity = identity
        self._share_sk = PrivateKey(randbytes(32))
        self._mask_sk = PrivateKey(randbytes(32))
        self._b = randbytes(32)
        self._adverts: dict[int, _Advert] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # sender -> (s-share, b-share)
        self._u2: frozenset[int] = frozenset()
        self._answered = False
        self.signed: frozenset[int] | None = None  # the survivor list this hospital signed
        self.answered_for: frozenset[int] | None = None  # the list its unmasking answered

    def advertise(self) -> bytes:
        """Round 0: two fresh public keys and a commitment to the self-mask seed, signed."""
        p = self.params
        body = _ADV.pack(
            p.round,
            self.index,
            bytes(self._share_sk.public_key),
            bytes(self._mask_sk.public_key),
            _kdf(b"commit", p.context, self._b),
        )
        return body + self._identity.sign(_ADVERT + p.context + body)

    def share_keys(self, adverts: bytes) -> dict[int, bytes]:
        """Round 1: Shamir shares of (mask key, b) for each advertised hospital, each sealed.

        Randomness for the polynomials comes from ``secrets`` (not the injectable source).
        """
        p = self.params
        self._adverts = _parse_adverts(adverts, p)
        if len(self._adverts) < p.threshold or self.index not in self._adverts:
            raise SecAggError(f"only {len(self._adverts)} hospitals advertised; need {p.threshold}")
        s_shares = dict(shamir.split(bytes(self._mask_sk), p.n, p.threshold))
        b_shares = dict(shamir.split(self._b, p.n, p.threshold))
        # My own shares stay with me: as a survivor I reveal my b-share like everyone else's.
        self._held[self.index] = (s_shares[self.index], b_shares[self.index])
        out = {}
        for v, adv in self._adverts.items():
            if v == self.index:
                continue
            plain = _SHARE_PLAIN.pack(p.round, self.index, v, s_shares[v], b_shares[v])
            box = Box(self._share_sk, PublicKey(adv.share_pk))
            out[v] = bytes(box.encrypt(plain))
        return out

    def masked_input(self, x: np.ndarray, inbox: Mapping[int, bytes]) -> bytes:
        """Round 2: store the shares others sealed to me, then send my masked vector.

        The pairwise masks run over U2: the hospitals whose shares reached me (and me).
        """
        p = self.params
        for u, ct in inbox.items():
            adv = self._adverts.get(u)
            if adv is None:
                raise SecAggError(f"shares from hospital {u}, which did not advertise")
            try:
                plain = Box(self._share_sk, PublicKey(adv.share_pk)).decrypt(ct)
                rnd, frm, to, s_share, b_share = _SHARE_PLAIN.unpack(plain)
            except (CryptoError, struct.error):
                raise SecAggError(f"shares from hospital {u} do not decrypt") from None
            if (rnd, frm, to) != (p.round, u, self.index):
                raise SecAggError(f"shares from hospital {u} are for another round or recipient")
            self._held[u] = (s_share, b_share)
        self._u2 = frozenset(self._held) | {self.index}
        if len(self._u2) < p.threshold:
            raise SecAggError(f"only {len(self._u2)} hospitals shared keys; need {p.threshold}")
        vec = np.asarray(x, dtype=np.float64).ravel()
        if vec.size != p.dim:
            raise SecAggError(f"vector has {vec.size} values, the aggregation {p.dim}")
        y = p.quantizer.encode(vec) + prg(_kdf(b"self", p.context, self._b), p.dim)
        secret = bytes(self._mask_sk)
        for v in sorted(self._u2 - {self.index}):
            mask = prg(_agree(secret, self._adverts[v].mask_pk, p.context), p.dim)
            y = y + mask if v > self.index else y - mask  # uint32 arithmetic wraps mod 2^32
        body = y.astype("<u4").tobytes()
        return _signed_head(self._identity, _MASKED, p, self.index, p.dim, body)

    def _check_survivors(self, alive: frozenset[int]) -> None:
        if len(alive) < self.params.threshold or not alive <= self._u2 or self.index not in alive:
            raise SecAggError("the survivor list names too few or unknown survivors")

    def sign_survivors(self, survivors: Sequence[int]) -> bytes:
        """Consistency check: sign the survivor list, one list per aggregation (re-signing the
        same list is idempotent; a different one is refused)."""
        alive = frozenset(survivors)
        self._check_survivors(alive)
        if self.signed is not None and self.signed != alive:
            raise SecAggError("already signed a different survivor list this round")
        self.signed = alive
        return sign_survivors(self._identity, self.params, alive)

    def unmask(
        self, survivors: Sequence[int], signatures: Mapping[int, bytes] | None = None
    ) -> bytes:
        """Round 3: b-shares of survivors, mask-key shares of dropouts; never both, once.

        With ``signatures`` (the actively secure variant; the actor path always passes them)
        the list must be the one this hospital signed and carry at least ``t`` valid
        signatures. Without, this is the honest-but-curious variant (in-process use only).
        """
        p = self.params
        alive = frozenset(survivors)
        if self._answered:
            raise SecAggError("already answered an unmasking request this round")
        self._check_survivors(alive)
        if signatures is not None:
            if self.signed != alive:
                raise SecAggError("unmasking request names a survivor list this hospital "
                                  "did not sign")
            good = survivor_signers(p, alive, signatures)
            if len(good) < p.threshold:
                raise SecAggError(f"only {len(good)} valid signatures on the survivor list; "
                                  f"need {p.threshold}")
        self._answered = True
        self.answered_for = alive
        entries = []
        for u in sorted(self._held):
            s_share, b_share = self._held[u]
            if u in alive:
                entries.append(_ENTRY.pack(u, _B_SHARE, b_share))
            else:
                entries.append(_ENTRY.pack(u, _S_SHARE, s_share))
        body = b"".join(entries)
        return _signed_head(self._identity, _UNMASK, p, self.index, len(entries), body)


# ---------------------------------------------------------------------------- the server


def _combine(shares: Mapping[int, bytes], threshold: int, owner: int) -> bytes:
    try:
        return shamir.combine(shares, threshold)
    except ConfigError as exc:
        raise SecAggError(f"cannot rebuild hospital {owner}'s key: {exc}") from None


@dataclass(slots=True)
class SecAggServer:
    """The coordinator's side: routes sealed shares, sums masked vectors, removes masks."""

    params: SecAggParams
    adverts: dict[int, _Advert] = field(default_factory=dict)
    u2: frozenset[int] = frozenset()
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def collect_adverts(self, msgs: Mapping[int, bytes]) -> bytes:
        """Check each advertisement and broadcast the list (U1) to everyone."""
        blob = b"".join(msgs[i] for i in sorted(msgs))
        self.adverts = _parse_adverts(blob, self.params)
        if set(self.adverts) != set(msgs):
            raise SecAggError("an advertisement names a different hospital than its sender")
        if len(self.adverts) < self.params.threshold:
            raise SecAggError("too few hospitals advertised keys")
        return blob

    def route_shares(self, outs: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Forward each sealed share to its recipient; U2 = hospitals that sent shares."""
        self.u2 = frozenset(u for u in outs if u in self.adverts)
        if len(self.u2) < self.params.threshold:
            raise SecAggError("too few hospitals shared keys")
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in self.u2}
        for u in self.u2:
            for v, ct in outs[u].items():
                if v in inbox:
                    inbox[v][u] = ct
        return inbox

    def collect_masked(self, msgs: Mapping[int, bytes]) -> list[int]:
        """Keep the signed, well-formed masked vectors; the senders are the survivors (U3)."""
        p = self.params
        for u, msg in msgs.items():
            if u not in self.u2:
                raise SecAggError(f"masked vector from hospital {u}, which shared no keys")
            count, body = _open_signed(msg, _MASKED, p, u)
            if count != p.dim or len(body) != 4 * p.dim:
                raise SecAggError(f"masked vector of hospital {u} has the wrong size")
            self.masked[u] = np.frombuffer(body, dtype="<u4").astype(np.uint32)
        if len(self.masked) < p.threshold:
            raise SecAggError(f"only {len(self.masked)} masked vectors; need {p.threshold}")
        return sorted(self.masked)

    def unmask_sum(self, answers: Mapping[int, bytes]) -> np.ndarray:
        """Rebuild dropouts' mask keys and survivors' self-mask seeds; return the integer sum."""
        p = self.params
        alive = set(self.masked)
        b_sh: dict[int, dict[int, bytes]] = {}
        s_sh: dict[int, dict[int, bytes]] = {}
        for v, msg in answers.items():
            if v not in alive:
                raise SecAggError(f"unmasking answer from hospital {v}, not a survivor")
            count, body = _open_signed(msg, _UNMASK, p, v)
            if len(body) != count * _ENTRY.size:
                raise SecAggError(f"unmasking answer of hospital {v} has the wrong size")
            for off in range(0, len(body), _ENTRY.size):
                u, kind, share = _ENTRY.unpack_from(body, off)
                if kind == _B_SHARE and u in alive:
                    b_sh.setdefault(u, {})[v] = share
                elif kind == _S_SHARE and u in self.u2 - alive:
                    s_sh.setdefault(u, {})[v] = share
                else:
                    raise SecAggError(f"hospital {v} revealed a share the protocol forbids")
        if len(answers) < p.threshold:
            raise SecAggError(
                f"only {len(answers)} hospitals answered unmasking; need {p.threshold}"
            )
        total = np.zeros(p.dim, dtype=np.uint32)
        for y in self.masked.values():
            total = total + y
        for u in alive:
            b = _combine(b_sh.get(u, {}), p.threshold, u)
            if _kdf(b"commit", p.context, b) != self.adverts[u].commit_b:
                raise SecAggError(f"self-mask seed of hospital {u} does not match its commitment")
            total = total - prg(_kdf(b"self", p.context, b), p.dim)
        for u in sorted(self.u2 - alive):
            sk = _combine(s_sh.get(u, {}), p.threshold, u)
            if bytes(PrivateKey(sk).public_key) != self.adverts[u].mask_pk:
                raise SecAggError(f"mask key of hospital {u} does not match its advertisement")
            for v in alive:
                mask = prg(_agree(sk, self.adverts[v].mask_pk, p.context), p.dim)
                # v added +mask if u > v, else -mask: take back exactly that.
                total = total - mask if u > v else total + mask
        return total

    def decoded_sum(self, total: np.ndarray) -> np.ndarray:
        return self.params.quantizer.decode_sum(total, len(self.masked))


# ---------------------------------------------------------------------------- driver


@dataclass(frozen=True, slots=True)
class SecAggResult:
    """The recovered sum and what the run cost (bytes on the wire, seconds per side)."""

    total: np.ndarray
    included: tuple[int, ...]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    client_s: float
    server_s: float
    masked_views: dict[int, bytes]

    @property
    def bytes_total(self) -> int:
        return sum(self.bytes_up.values()) + sum(self.bytes_down.values())


def run_protocol(
    params: SecAggParams,
    identities: Mapping[str, Identity],
    inputs: Mapping[int, np.ndarray],
    drop_before_masking: frozenset[int] = frozenset(),
    drop_after_masking: frozenset[int] = frozenset(),
    randbytes: Callable[[int], bytes] = os.urandom,
) -> SecAggResult:
    """All rounds in one process with real keys, shares, ciphers and signatures (the
    consistency check included).

    ``drop_before_masking``: hospitals that vanish after sharing keys (their vector is not in
    the sum; their pairwise masks are rebuilt from shares). ``drop_after_masking``: hospitals
    that send their masked vector and then vanish (in the sum; self-mask rebuilt).
    """
    up = {"advertise": 0, "share_keys": 0, "masked_input": 0, "consistency": 0, "unmask": 0}
    down = {"advertise": 0, "share_keys": 0, "consistency": 0, "unmask": 0}
    clock = _Clock()
    clients = {
        i + 1: SecAggClient(params, identities[peer], randbytes)
        for i, peer in enumerate(params.peers)
    }
    server = SecAggServer(params)
    adverts = {i: clock.client(c.advertise) for i, c in clients.items()}
    up["advertise"] = sum(len(a) for a in adverts.values())
    blob = clock.server(lambda: server.collect_adverts(adverts))
    down["advertise"] = len(blob) * len(clients)
    outs: dict[int, dict[int, bytes]] = {}
    for i, c in clients.items():
        outs[i] = clock.client(lambda c=c: c.share_keys(blob))  # type: ignore[misc]
    up["share_keys"] = sum(len(ct) for o in outs.values() for ct in o.values())
    inbox = clock.server(lambda: server.route_shares(outs))
    down["share_keys"] = sum(len(ct) for m in inbox.values() for ct in m.values())
    masked: dict[int, bytes] = {}
    for i in sorted(inbox):
        if i not in drop_before_masking:
            c = clients[i]
            masked[i] = clock.client(lambda c=c, i=i: c.masked_input(inputs[i], inbox[i]))  # type: ignore[misc]
    up["masked_input"] = sum(len(m) for m in masked.values())
    survivors = clock.server(lambda: server.collect_masked(masked))
    answering = [i for i in survivors if i not in drop_after_masking]
    down["unmask"] = 2 * len(survivors) * len(answering)  # the survivor list, to each
    # Consistency check: every survivor still there signs U3; the signatures go to each.
    sigs = {i: clock.client(lambda c=clients[i]: c.sign_survivors(survivors))  # type: ignore[misc]
            for i in answering}
    up["consistency"] = 64 * len(sigs)
    down["consistency"] = 64 * len(sigs) * len(answering)
    answers: dict[int, bytes] = {}
    for i in answering:
        c = clients[i]
        answers[i] = clock.client(lambda c=c: c.unmask(survivors, sigs))  # type: ignore[misc]
    up["unmask"] = sum(len(a) for a in answers.values())
    total = clock.server(lambda: server.unmask_sum(answers))
    decoded = server.decoded_sum(total)
    return SecAggResult(
        decoded, tuple(survivors), up, down, clock.client_s, clock.server_s, masked
    )


T = TypeVar("T")


class _Clock:
    """Adds up the time spent on each side of the protocol."""

    def __init__(self) -> None:
        self.client_s = 0.0
        self.server_s = 0.0

    def client(self, fn: Callable[[], T]) -> T:
        t = time.perf_counter()
        out = fn()
        self.client_s += time.perf_counter() - t
        return out

    def server(self, fn: Callable[[], T]) -> T:
        t = time.perf_counter()
        out = fn()
        self.server_s += time.perf_counter() - t
        return out
