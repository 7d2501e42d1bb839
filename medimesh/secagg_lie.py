"""What a lying hospital can send in a secure round (issue 15, attack 8), for drills and tests.

A hospital runs its own software: nothing stops it from adding any words (mod 2^32) to its
honest masked vector and signing the result with its own key. Before unmasking the result is
indistinguishable from an honest masked vector (there is no range proof); after unmasking the
coordinator sees only the sum, which :func:`medimesh.secagg_policy.bound_sum` checks and clamps.
The hospital behaviour ``secagg_liar`` uses :func:`lie`.
"""

from __future__ import annotations

import numpy as np

from medimesh.identity import Identity
from medimesh.protocol import SecAggMasked
from medimesh.secagg import _HEAD, _MASKED, SecAggParams, _signed_head
from medimesh.secagg_round import b64d, b64e

__all__ = ["LIAR_SHIFT", "lie", "shift_words"]

LIAR_SHIFT = 4.0  # the drill liar adds 4 C to the sum's first coordinate (honest: <= C n_i/N)


def shift_words(params: SecAggParams, shift: np.ndarray) -> np.ndarray:
    """The uint32 words that move the decoded sum by ``shift`` (in the sum's own units)."""
    steps = np.rint(np.asarray(shift, dtype=np.float64) * params.quantizer.scale)
    return np.mod(steps, 2.0**32).astype(np.uint64).astype(np.uint32)


def lie(msg: SecAggMasked, identity: Identity, params: SecAggParams, shift: np.ndarray) -> (
    SecAggMasked
):
    """The same masked message with ``shift`` added to what it contributes, re-signed."""
    raw = b64d(msg.masked)
    head, body = raw[: _HEAD.size], raw[_HEAD.size : -64]
    _, index, count = _HEAD.unpack(head)
    y = np.frombuffer(body, dtype="<u4").astype(np.uint32) + shift_words(params, shift)
    signed = _signed_head(identity, _MASKED, params, index, count, y.astype("<u4").tobytes())
    return SecAggMasked(msg.round, msg.base_hash, msg.n_examples, b64e(signed), dict(msg.eval))
