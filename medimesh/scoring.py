"""The validator's cross-update scores for one round: evidence, never a verdict by itself.

:mod:`medimesh.validation` judges each update on its own (signature, shape, norm bound, ...).
This module compares a round's updates with each other and returns *flags* — each one a
reason, the score that raised it and the threshold it crossed. Whether a flag excludes anyone
is the policy's decision (:mod:`medimesh.reputation`): with no dishonest hospital declared,
nobody is excluded on statistics; with f declared, at most f per round.

The scores are built to respect heterogeneity (a hospital whose patients differ is not a
cheater) and to resist framing (a crafted update must not get an honest hospital flagged):

- ``norm_ratio``: the update's norm over the median norm of the *other* trusted updates.
  ``norm_outlier`` only above ``norm_ratio`` (8x) — or above ``jump_ratio`` (3x) when the
  hospital also jumped above ``self_jump`` (2x) its *own* recent norms. Honest non-IID sites
  reached 5.0x the others' median (rare cohort, a site with most of a rare disease), always
  within 1.4x of their own history; a x10 scaler is caught either way, and clipping bounds
  whatever stays below.
- ``loo_cosine``: cosine between the update and the coordinate-wise median of the *unit*
  vectors of the other trusted updates (leave-self-out, scale-free, robust). A crafted update
  of any norm counts as one unit vector among the others, and a median cannot be moved outside
  the range of the honest values by fewer than half of them, so one attacker cannot bend a
  victim's reference. ``opposes_others`` only while those others agree (the median of their
  pairwise cosines >= ``consensus``, 0.2) and the cosine is below ``opposes_cos`` (-0.3).
  Calibration (in-process FedAvgM, 5 seeds): honest cosines with the gate open were >= -0.15
  (rare cohort, 8 and 10 sites) and >= 0.0 (heart centres); on the sparse consortium the gate
  never opened (2 seeds). Honest non-IID updates late in training cancel out, the gate closes
  and nothing is judged.
- ``free_rider``: norm below ``free_rider_ratio`` (5 %) of the round's median norm, or a copy
  of ``previous`` (the last aggregate step).
- ``near_duplicate``: two updates closer than ``duplicate_tol`` times the median pairwise
  distance. Honest sites train on different rows and never coincide. Only the *later* of the
  pair (in arrival order) is flagged: copying an honest update cannot get its author flagged.

"Trusted" excludes free riders and ``suspects`` (hospitals the policy has quarantined): their
updates are scored — so they can earn re-admission — but never shape anyone else's reference.
Fewer than three trusted others: no norm or direction test for that update (with two, nobody
can tell which one is odd). Pure numpy; the caller decides.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medimesh.errors import ConfigError

__all__ = ["SCORE_REASONS", "Flag", "RoundScore", "Thresholds", "score_round"]

SCORE_REASONS = {
    "norm_outlier": "the update's norm is far above the other hospitals' median norm",
    "opposes_others": "the update points against the other hospitals while they agree",
    "free_rider": "the update is (near) zero or a copy of the previous aggregate step",
    "near_duplicate": "the update is (almost) identical to one another hospital sent earlier",
}

_TINY = 1e-12


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Calibrated on honest variation (module docstring); every flag names the one it used."""

    norm_ratio: float = 8.0
    jump_ratio: float = 3.0
    self_jump: float = 2.0
    opposes_cos: float = -0.3
    consensus: float = 0.2
    free_rider_ratio: float = 0.05
    duplicate_tol: float = 1e-3
    exact_loo_max: int = 12  # above this, one shared median stands in for each leave-one-out

    def __post_init__(self) -> None:
        if not (self.norm_ratio >= self.jump_ratio > 1 and self.self_jump > 1):
            raise ConfigError("norm thresholds need norm_ratio >= jump_ratio > 1, self_jump > 1")
        if not (-1 <= self.opposes_cos <= 1 and -1 <= self.consensus <= 1):
            raise ConfigError("cosine thresholds must lie in [-1, 1]")
        if not (0 <= self.free_rider_ratio < 1 and self.duplicate_tol >= 0):
            raise ConfigError("free_rider_ratio must be in [0, 1), duplicate_tol >= 0")
        if self.exact_loo_max < 3:
            raise ConfigError("exact_loo_max must be at least 3")


@dataclass(frozen=True, slots=True)
class Flag:
    """One piece of evidence: why, the score, and the threshold it crossed."""

    reason: str
    score: float
    threshold: float

    @property
    def severity(self) -> float:
        """How far past its threshold (>= 1 for any flag), to rank suspects under a budget."""
        if self.reason == "norm_outlier":
            return 1.0 + math.log(max(self.score, _TINY) / self.threshold)
        if self.reason == "opposes_others":
            return 1.0 + (self.threshold - self.score)
        if self.reason == "free_rider":
            return 1.0 + max(self.threshold - self.score, 0.0) / max(self.threshold, _TINY)
        return 2.0  # near_duplicate: an exact copy is strong evidence

    def to_dict(self) -> dict[str, float | str]:
        return {"reason": self.reason, "score": self.score, "threshold": self.threshold}


@dataclass(frozen=True, slots=True)
class RoundScore:
    """One update's scores in its round; NaN where a score was not defined."""

    norm: float
    norm_ratio: float
    self_ratio: float
    loo_cosine: float
    loo_consensus: float
    flags: tuple[Flag, ...] = field(default=())

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f.reason for f in self.flags)

    @property
    def severity(self) -> float:
        return sum(f.severity for f in self.flags)

    def numbers(self) -> dict[str, float]:
        """The defined scores, for the audit trail (strict JSON has no NaN)."""
        raw = {
            "norm": self.norm,
            "norm_ratio": self.norm_ratio,
            "self_ratio": self.self_ratio,
            "loo_cosine": self.loo_cosine,
            "loo_consensus": self.loo_consensus,
        }
        return {k: v for k, v in raw.items() if math.isfinite(v)}


def score_round(
    updates: Mapping[str, np.ndarray],
    *,
    arrival: Sequence[str] | None = None,
    history: Mapping[str, Sequence[float]] | None = None,
    previous: np.ndarray | None = None,
    suspects: Collection[str] = (),
    thresholds: Thresholds | None = None,
) -> dict[str, RoundScore]:
    """Score every update of one round against the others; keys are the senders.

    ``arrival``: the order the updates arrived in (decides which of a duplicate pair is the
    copy; default: sorted keys). ``history``: each sender's recent update norms.
    ``previous``: the last aggregate step (a copy of it is free riding). ``suspects``: scored,
    but kept out of everyone else's reference.
    """
    th = thresholds or Thresholds()
    names = sorted(updates)
    if not names:
        return {}
    order = list(arrival) if arrival is not None else names
    if sorted(order) != names:
        raise ConfigError("arrival must list every sender exactly once")
    rows = [np.asarray(updates[k], dtype=np.float64).ravel() for k in names]
    if any(r.shape != rows[0].shape for r in rows):
        raise ConfigError("updates must all have the same size")
    x = np.stack(rows)
    if not np.isfinite(x).all():
        raise ConfigError("updates must be finite")
    n = len(names)
    norms = np.linalg.norm(x, axis=1)
    flags: list[list[Flag]] = [[] for _ in range(n)]

    # Free riders first: zeros and replays must not shape anyone's reference.
    med_all = float(np.median(norms))
    ratio_cut = th.free_rider_ratio * med_all if n >= 3 else 0.0
    free = norms <= max(ratio_cut, _TINY)
    for i in np.flatnonzero(free):
        flags[i].append(Flag("free_rider", norms[i] / max(med_all, _TINY), th.free_rider_ratio))
    if previous is not None:
        prev = np.asarray(previous, dtype=np.float64).ravel()
        if prev.shape != x.shape[1:]:
            raise ConfigError(f"previous has {prev.size} values, updates have {x.shape[1]}")
        pnorm = float(np.linalg.norm(prev))
        if pnorm > _TINY:
            gap = np.linalg.norm(x - prev, axis=1) / pnorm
            for i in np.flatnonzero((gap <= th.duplicate_tol) & ~free):
                free[i] = True
                flags[i].append(Flag("free_rider", float(gap[i]), th.duplicate_tol))

    suspect = np.array([k in suspects for k in names])
    trusted = ~free & ~suspect
    unit = x / np.maximum(norms, _TINY)[:, None]
    gram = unit @ unit.T
    nan = float("nan")
    norm_ratio = np.full(n, nan)
    self_ratio = np.full(n, nan)
    loo_cos = np.full(n, nan)
    loo_cons = np.full(n, nan)
    shared = _shared_reference(unit, gram, trusted, th)
    hist = history or {}
    for i in np.flatnonzero(~free):
        others = trusted.copy()
        others[i] = False
        if int(others.sum()) < 3:
            continue
        norm_ratio[i] = norms[i] / max(float(np.median(norms[others])), _TINY)
        past = [v for v in hist.get(names[i], ()) if v > 0 and math.isfinite(v)]
        if past:
            self_ratio[i] = norms[i] / float(np.median(past))
        if norm_ratio[i] > th.norm_ratio:
            flags[i].append(Flag("norm_outlier", float(norm_ratio[i]), th.norm_ratio))
        elif norm_ratio[i] > th.jump_ratio and self_ratio[i] > th.self_jump:
            flags[i].append(Flag("norm_outlier", float(norm_ratio[i]), th.jump_ratio))
        if shared is None:
            ref = np.median(unit[others], axis=0)
            cons = _median_offdiag(gram[np.ix_(others, others)])
        else:
            ref, cons = shared
        rn = float(np.linalg.norm(ref))
        if rn > _TINY:
            loo_cos[i] = float(unit[i] @ ref) / rn
            loo_cons[i] = cons
            if cons >= th.consensus and loo_cos[i] < th.opposes_cos:
                flags[i].append(Flag("opposes_others", float(loo_cos[i]), th.opposes_cos))

    # Duplicates: only the later of a pair is the copy; honest sites never coincide.
    active = np.flatnonzero(~free)
    if len(active) >= 3 and th.duplicate_tol > 0:
        sq = np.einsum("ij,ij->i", x[active], x[active])
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x[active] @ x[active].T), 0.0)
        dist = np.sqrt(d2)
        typical = float(np.median(dist[np.triu_indices(len(active), 1)]))
        rank = {k: j for j, k in enumerate(order)}
        if typical > _TINY:
            for a in range(len(active)):
                for b in range(a + 1, len(active)):
                    if dist[a, b] <= th.duplicate_tol * typical:
                        ia, ib = int(active[a]), int(active[b])
                        later = ia if rank[names[ia]] > rank[names[ib]] else ib
                        if "near_duplicate" not in [f.reason for f in flags[later]]:
                            flags[later].append(
                                Flag("near_duplicate", float(dist[a, b] / typical),
                                     th.duplicate_tol)
                            )

    return {
        k: RoundScore(
            norm=float(norms[i]),
            norm_ratio=float(norm_ratio[i]),
            self_ratio=float(self_ratio[i]),
            loo_cosine=float(loo_cos[i]),
            loo_consensus=float(loo_cons[i]),
            flags=tuple(flags[i]),
        )
        for i, k in enumerate(names)
    }


def _median_offdiag(g: np.ndarray) -> float:
    m = g.shape[0]
    if m < 2:
        return float("nan")
    return float(np.median(g[np.triu_indices(m, 1)]))


def _shared_reference(
    unit: np.ndarray, gram: np.ndarray, trusted: np.ndarray, th: Thresholds
) -> tuple[np.ndarray, float] | None:
    """Large rounds: one median over all trusted units stands in for every leave-one-out
    median (one update moves a median of more than ``exact_loo_max`` values very little), so
    a round of 50 costs one median instead of 50."""
    if int(trusted.sum()) <= th.exact_loo_max:
        return None
    return np.median(unit[trusted], axis=0), _median_offdiag(gram[np.ix_(trusted, trusted)])
