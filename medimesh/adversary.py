"""Protocol attacks: what a dishonest hospital can do to the wire, as pure envelope builders.

Each builder takes the honest update a hospital would send and returns the malicious envelope
it sends instead. They exist to prove, in tests and in ``medimesh bench byzantine``, that every
one of them is refused — by the router (signature, enrolment) or by the validator (binding,
shape, values, size, counts) — and that the refusal and its reason land in the audit trail.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from medimesh.identity import Identity
from medimesh.protocol import Update
from medimesh.wire import seal

__all__ = ["EXPECTED_REASON", "PROTOCOL_ATTACKS", "AttackContext", "protocol_envelope"]


@dataclass(frozen=True, slots=True)
class AttackContext:
    """What the attacker holds: its own key, the recipients, and what it saw earlier."""

    identity: Identity
    recipients: Sequence[str]
    round: int
    previous_envelope: bytes | None
    victim: str  # another hospital's peer id, for impersonation
    committed: int


def _send(ctx: AttackContext, update: Update, round_: int | None = None) -> bytes:
    r = ctx.round if round_ is None else round_
    return seal(ctx.identity, Update.TYPE, list(ctx.recipients), r, update.to_payload())


def _replay(ctx: AttackContext, update: Update) -> bytes:
    return ctx.previous_envelope or _send(ctx, update)


def _closed_round(ctx: AttackContext, update: Update) -> bytes:
    stale = dataclasses.replace(update, round=ctx.round - 1)
    return _send(ctx, stale, ctx.round - 1)


def _wrong_base(ctx: AttackContext, update: Update) -> bytes:
    return _send(ctx, dataclasses.replace(update, base_hash=os.urandom(32).hex()))


def _forged_signature(ctx: AttackContext, update: Update) -> bytes:
    env = bytearray(_send(ctx, update))
    env[-1] ^= 0x5A  # the outer signature no longer verifies
    return bytes(env)


def _unenrolled_key(ctx: AttackContext, update: Update) -> bytes:
    stranger = Identity.generate()
    return seal(stranger, Update.TYPE, list(ctx.recipients), ctx.round, update.to_payload())


def _impersonation(ctx: AttackContext, update: Update) -> bytes:
    """Claim another hospital's identity: the header names the victim, our key signs."""
    env = _send(ctx, update)
    return env.replace(ctx.identity.peer_id.encode(), ctx.victim.encode(), 1)


def _tampered_ciphertext(ctx: AttackContext, update: Update) -> bytes:
    env = bytearray(_send(ctx, update))
    env[-100] ^= 0xFF  # a byte of the sealed payload, changed in flight
    return bytes(env)


def _wrong_shape(ctx: AttackContext, update: Update) -> bytes:
    bigger = np.vstack([update.delta_w, np.zeros((1, update.delta_w.shape[1]), np.float32)])
    return _send(ctx, dataclasses.replace(update, delta_w=bigger))


def _non_finite(ctx: AttackContext, update: Update) -> bytes:
    bad = update.delta_w.copy()
    bad.flat[0] = np.nan
    bad.flat[-1] = np.inf
    return _send(ctx, dataclasses.replace(update, delta_w=bad))


def _oversized(ctx: AttackContext, update: Update) -> bytes:
    k = update.delta_w.shape[1]
    rows = (5 * 1024 * 1024) // (4 * k) + 1  # 5 MiB of floats: over the validator's bound
    return _send(ctx, dataclasses.replace(update, delta_w=np.zeros((rows, k), np.float32)))


def _inflated_count(ctx: AttackContext, update: Update) -> bytes:
    return _send(ctx, dataclasses.replace(update, n_examples=max(ctx.committed, 1) * 100))


PROTOCOL_ATTACKS: dict[str, Callable[[AttackContext, Update], bytes]] = {
    "replay": _replay,
    "closed_round": _closed_round,
    "wrong_base": _wrong_base,
    "forged_signature": _forged_signature,
    "unenrolled_key": _unenrolled_key,
    "impersonation": _impersonation,
    "tampered_ciphertext": _tampered_ciphertext,
    "wrong_shape": _wrong_shape,
    "non_finite": _non_finite,
    "oversized": _oversized,
    "inflated_count": _inflated_count,
}

# Where each attack is stopped and the reason recorded in the audit trail:
# router refusals are "message_refused" events, validator refusals are "verdict" events.
EXPECTED_REASON: dict[str, tuple[str, str]] = {
    "replay": ("verdict", "replay"),
    "closed_round": ("verdict", "stale_round"),
    "wrong_base": ("verdict", "wrong_base"),
    "forged_signature": ("message_refused", "BadSignature"),
    "unenrolled_key": ("message_refused", "NotEnrolled"),
    "impersonation": ("message_refused", "BadSignature"),
    "tampered_ciphertext": ("message_refused", "BadSignature"),
    "wrong_shape": ("verdict", "wrong_shape"),
    "non_finite": ("verdict", "non_finite"),
    "oversized": ("verdict", "too_large"),
    "inflated_count": ("verdict", "bad_example_count"),
}


def protocol_envelope(name: str, ctx: AttackContext, honest: Update) -> bytes:
    """The malicious envelope for attack ``name`` (KeyError for an unknown attack)."""
    return PROTOCOL_ATTACKS[name](ctx, honest)
