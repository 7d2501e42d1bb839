"""A hospital's own rules for secure aggregation, and what the coordinator can check of a sum.

Issue 15 ("trust no operator"): the coordinator may be hostile, so a hospital checks every
secure-aggregation request against what it holds itself — its roster copy and one policy flag
given at construction — never against what a message says. Pure logic, no Ray and no I/O.

The rules (:class:`SecAggPolicy`, docs/privacy.md "Secure aggregation against a malicious
coordinator"):

- **Required**: when the hospital was started in a secure-aggregation consortium
  (``required``), a RoundStart with ``secagg_threshold = 0`` (a plaintext round) is refused.
- **Peers**: the round's peer set (the RoundStart's committed hospitals) must be hospitals of
  the roster copy, distinct, and include this hospital.
- **Minimum group**: at least ``min(3, hospitals on the roster)`` peers.
- **Minimum threshold**: ``t >= floor(2n/3) + 1`` (so ``t > 2n/3``, and ``t >= 2``) for ``n``
  peers, ``t <= n``. With the consistency check, a coordinator can only make honest hospitals
  reveal both shares of one hospital if it controls ``c >= 2t - n`` hospitals; this rule makes
  that more than a third of the group.
- **One masked input per round** (:class:`MaskLedger`): once a hospital released a masked
  vector for round r (or for base model h), it masks nothing else for r (or h), whatever the
  peer set: two sums over different groups, subtracted, would reveal one update.

After unmasking the coordinator sees the sum only. :func:`bound_sum` checks what it can: every
honest summand is a delta clipped to L2 norm C times ``n_i / N``, so the sum's L2 norm is at
most ``C * sum(n_i / N)`` (plus the quantization error); a larger sum is named and projected
back onto that ball. What a liar can still do inside the ball is stated in docs/privacy.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medimesh.identity import Roster
from medimesh.protocol import RoundStart
from medimesh.secagg import SecAggError

__all__ = [
    "MIN_GROUP",
    "MaskLedger",
    "SecAggPolicy",
    "SecAggRefused",
    "SumCheck",
    "bound_sum",
    "min_threshold",
]

MIN_GROUP = 3  # peers in a secure round, unless the roster has fewer hospitals


def min_threshold(n: int) -> int:
    """The smallest Shamir threshold a hospital accepts for ``n`` peers: t > 2n/3, t >= 2."""
    return max(2, (2 * n) // 3 + 1)


class SecAggRefused(SecAggError):
    """A hospital refuses a secure-aggregation request: ``rule`` names which of its rules."""

    def __init__(self, rule: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.rule = rule
        self.details = details

    def audit_body(self) -> dict[str, Any]:
        """What the hospital's ``secagg_refused`` audit event records (never a value)."""
        return {"rule": self.rule, "reason": str(self), **self.details}


@dataclass(frozen=True, slots=True)
class SecAggPolicy:
    """What one hospital accepts, from its own roster copy and its own ``required`` flag."""

    hospitals: frozenset[str]
    required: bool = False
    min_group: int = MIN_GROUP

    @classmethod
    def from_roster(cls, roster: Roster, required: bool) -> SecAggPolicy:
        hospitals = frozenset(m.peer_id for m in roster.with_role("hospital"))
        return cls(hospitals, required, max(2, min(MIN_GROUP, len(hospitals))))

    def check(self, start: RoundStart, me: str) -> None:
        """Raise :class:`SecAggRefused` unless this hospital may answer ``start`` at all."""
        t = start.secagg_threshold
        if t == 0:
            if self.required:
                raise SecAggRefused(
                    "secagg_required",
                    "secure aggregation is required here; a plaintext round is refused",
                    threshold=0,
                )
            return
        peers = sorted(start.committed)
        base = {"threshold": t, "peers": peers}
        strangers = [p for p in peers if p not in self.hospitals]
        if strangers:
            raise SecAggRefused(
                "peers_not_on_roster",
                f"{len(strangers)} of {len(peers)} peers are not hospitals of this roster",
                strangers=strangers, **base,
            )
        if me not in peers:
            raise SecAggRefused("not_a_peer", "this hospital is not among the peers", **base)
        n = len(peers)
        if n < self.min_group:
            raise SecAggRefused(
                "group_too_small", f"{n} peers; at least {self.min_group} required",
                minimum=self.min_group, **base,
            )
        low = min_threshold(n)
        if not low <= t <= n:
            raise SecAggRefused(
                "threshold_too_low" if t < low else "threshold_too_high",
                f"threshold {t} for {n} peers; this hospital requires {low} <= t <= {n}",
                minimum=low, **base,
            )
        if not (math.isfinite(start.secagg_clip) and start.secagg_clip > 0):
            raise SecAggRefused(
                "bad_clip", "the quantizer range must be positive and finite", **base
            )


@dataclass(slots=True)
class MaskLedger:
    """Rounds and base models a hospital already released a masked input for (in memory)."""

    rounds: dict[int, str] = field(default_factory=dict)  # round -> base model hash
    bases: set[str] = field(default_factory=set)

    def check(self, round_: int, base_hash: str, peers: Iterable[str]) -> None:
        if round_ in self.rounds or base_hash in self.bases:
            raise SecAggRefused(
                "already_masked",
                f"a masked input was already released for round {round_} or its base model",
                round=round_, base_hash=base_hash, released_base=self.rounds.get(round_, ""),
                peers=sorted(peers),
            )

    def record(self, round_: int, base_hash: str) -> None:
        self.rounds[round_] = base_hash
        self.bases.add(base_hash)


@dataclass(frozen=True, slots=True)
class SumCheck:
    """The L2 check of an unmasked weighted sum: its norm, the bound, whether it was cut."""

    norm: float
    bound: float
    clamped: bool

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "bound": self.bound, "clamped": self.clamped}


def bound_sum(
    total: np.ndarray, clip: float, committed: Mapping[str, int], included: Iterable[str],
    error_bound: float,
) -> tuple[np.ndarray, SumCheck]:
    """Check (and if needed clamp) the decoded sum of the included hospitals' vectors.

    Each honest vector has L2 norm <= ``clip * n_i / N`` (N: all committed examples), so the
    sum's norm is at most ``clip * sum(n_i) / N``, plus ``sqrt(d) * error_bound`` of rounding.
    A larger norm means some hospital lied; the sum is projected onto the ball of radius
    ``clip * sum(n_i) / N`` (the step stays bounded, the round goes on).
    """
    vec = np.asarray(total, dtype=np.float64)
    n_all = sum(committed.values())
    weight = sum(committed[p] for p in included) / n_all if n_all > 0 else 0.0
    radius = clip * weight
    bound = radius + math.sqrt(vec.size) * error_bound
    norm = float(np.linalg.norm(vec))
    if norm <= bound:
        return vec, SumCheck(norm, bound, False)
    return vec * (radius / norm), SumCheck(norm, bound, True)
