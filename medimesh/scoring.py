"""The validator's cross-update scoring of one round: which updates look unlike the others.

:mod:`medimesh.validation` judges each update on its own (signature, shape, norm bound, ...).
This module compares a round's updates with each other, using statistics that fewer than half
of the senders cannot move (medians, MADs, the coordinate-wise median). It is pure numpy.

Scores per update:

- ``norm_z``: robust z-score of the *log* L2 norm, ``(log|u| - median) / (1.4826 * MAD)``.
  Logs make scaling symmetric (x10 and x0.1 are equally far) and the spread is floored at
  ``min_spread`` (default 0.25, i.e. +-25 %) so rounds whose honest norms agree closely do not
  turn small differences into large z. With ``z_max = 3.5`` (Iglewicz & Hoaglin's cut-off for
  modified z-scores) an update is a ``norm_outlier`` only above ~2.4x the median norm.
- ``cosine``: to a robust reference direction: ``reference`` if given (e.g. the previous
  aggregate), else the coordinate-wise median of the round's updates. An update is a
  ``direction_outlier`` only if BOTH its cosine is below ``cos_min`` (default 0: pointing away
  from the consensus) AND its cosine is a robust low outlier among the round's cosines (z below
  ``-z_max``, spread floored at ``cos_spread`` = 0.1). The relative test matters: as a non-IID
  federation converges, honest deltas stop agreeing (site-specific pulls that cancel out) and
  honest cosines to the median drift towards and below 0; an absolute threshold alone then
  rejected ~30 % of honest updates in our synthetic runs. Sign flipping and IPM give cosines
  near -1 while the consensus is strong (the rounds where they do the most damage).
- ``distance_z``: robust z of the log distance to the coordinate-wise median, same floor; a
  ``distance_outlier`` lies more than ~2.4x the median distance away (noise, large-z ALIE).
- ``free_rider``: norm below ``free_rider_ratio`` (5 %) of the median norm (zero updates), or
  a copy of ``reference`` (a sender replaying the previous aggregate).
- ``near_duplicate``: two senders whose updates are (almost) identical, closer than
  ``duplicate_tol`` times the median pairwise distance. Honest sites train on different rows
  and never coincide; colluders sending one shared crafted vector (ALIE, IPM) do.

- ``loo_cosine`` / ``opposes_others``: the cosine of an update to the mean of the *other*
  updates (leave-one-out, so a suspect cannot bend its own reference), judged only when those
  others agree with each other (median pairwise cosine >= ``loo_consensus``, 0.2). An update
  below ``loo_cos_max`` (-0.2) then opposes a consensus it had no part in. This is the test
  that works with few sites: with four heart centers a label-flipped or IPM site sits at
  -0.3 in round 1 while the three honest ones agree (+0.2 to +0.5), but the median/MAD test
  cannot separate one value in four. Late in training honest updates stop agreeing (they
  cancel out near the optimum), the gate closes, and nothing is judged. It judges only rounds
  of 4 to ``loo_max_n`` (5) updates: from 6 on the robust z-test works, while an honest site
  with an unusual case mix sometimes opposes the others' mean (one of 8 rare-cohort sites did,
  in round 5 of a lossy run) and would be quarantined for it.

Small rounds: with fewer than ``small_n`` (4) non-free-rider updates the thresholds double and
``cos_min`` drops to at most -0.5, so only extreme cases are flagged; with fewer than 3 nothing
but free riders is flagged (with two updates nobody can tell which one is the odd one out).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medimesh.aggregation import pairwise_sq_distances
from medimesh.errors import ConfigError

__all__ = ["SCORE_REASONS", "RoundScore", "score_round"]

SCORE_REASONS = {
    "norm_outlier": "the update's norm is far above the round's median norm",
    "direction_outlier": "the update points away from the round's robust consensus direction",
    "distance_outlier": "the update is far from the round's coordinate-wise median",
    "free_rider": "the update is (near) zero or a copy of the previous aggregate",
    "near_duplicate": "the update is (almost) identical to another sender's update",
    "opposes_others": "the update points against the other senders' mean while they agree",
}

_MAD_TO_SIGMA = 1.4826
_TINY = 1e-12


@dataclass(frozen=True, slots=True)
class RoundScore:
    """One update's scores in its round; ``reasons`` is empty iff ``accepted``."""

    norm: float
    norm_z: float
    cosine: float
    distance: float
    distance_z: float
    accepted: bool
    reasons: tuple[str, ...]
    loo_cosine: float = float("nan")
    loo_consensus: float = float("nan")


def _robust_z(values: np.ndarray, min_spread: float) -> np.ndarray:
    med = float(np.median(values))
    spread = max(_MAD_TO_SIGMA * float(np.median(np.abs(values - med))), min_spread)
    return np.asarray((values - med) / spread)


def _log(values: np.ndarray) -> np.ndarray:
    return np.asarray(np.log(np.maximum(values, _TINY)))


def score_round(
    updates: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    reference: np.ndarray | None = None,
    *,
    z_max: float = 3.5,
    cos_min: float = 0.0,
    min_spread: float = 0.25,
    cos_spread: float = 0.1,
    free_rider_ratio: float = 0.05,
    duplicate_tol: float = 1e-3,
    small_n: int = 4,
    loo_cos_max: float = -0.2,
    loo_consensus: float = 0.2,
    loo_max_n: int = 5,
) -> dict[str, RoundScore]:
    """Score every update of one round against the others; keys are the senders.

    ``weights`` (example counts) must cover the same senders; they are validated but do not
    influence the statistics, so a site cannot buy influence over the reference by claiming
    many examples. ``reference`` (optional, e.g. the previous aggregate) replaces the round's
    median as the reference *direction* and enables the copy-of-previous free-rider check.
    """
    if set(updates) != set(weights):
        raise ConfigError("scoring needs one weight per update and no other weights")
    if z_max <= 0 or not -1 <= cos_min <= 1 or min_spread <= 0 or free_rider_ratio < 0:
        raise ConfigError("invalid scoring thresholds")
    if any(not w > 0 for w in weights.values()):
        raise ConfigError("example counts must be positive")
    names = sorted(updates)
    if not names:
        return {}
    rows = [np.asarray(updates[k], dtype=np.float64).ravel() for k in names]
    if any(r.shape != rows[0].shape for r in rows):
        raise ConfigError("updates must all have the same size")
    x = np.stack(rows)
    if not np.isfinite(x).all():
        raise ConfigError("updates must be finite")
    n = len(names)
    norms = np.linalg.norm(x, axis=1)
    reasons: list[list[str]] = [[] for _ in range(n)]

    # Free riders first, so that zeros do not drag the robust statistics.
    # The ratio test needs a meaningful median (n >= 3); below that only exact zeros count.
    ratio = free_rider_ratio * float(np.median(norms)) if n >= 3 else 0.0
    free = norms <= max(ratio, _TINY)
    ref: np.ndarray | None = None
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64).ravel()
        if ref.shape != x.shape[1:]:
            raise ConfigError(f"reference has {ref.size} values, updates have {x.shape[1]}")
        rnorm = float(np.linalg.norm(ref))
        if rnorm > _TINY:
            free |= np.linalg.norm(x - ref, axis=1) <= duplicate_tol * rnorm
    for i in np.flatnonzero(free):
        reasons[i].append("free_rider")

    active = np.flatnonzero(~free)
    m = len(active)
    nan = float("nan")
    norm_z = np.full(n, nan)
    cosine = np.full(n, nan)
    dist = np.full(n, nan)
    dist_z = np.full(n, nan)
    if m >= 1:
        xa = x[active]
        center = np.median(xa, axis=0)
        direction = center if ref is None or np.linalg.norm(ref) <= _TINY else ref
        dnorm = float(np.linalg.norm(direction))
        if dnorm > _TINY:
            cosine = (x @ direction) / (np.maximum(norms, _TINY) * dnorm)
        dist = np.linalg.norm(x - center, axis=1)
        norm_z[active] = _robust_z(_log(norms[active]), min_spread)
        dist_z[active] = _robust_z(_log(dist[active]), min_spread)
    if m >= 3:
        small = m < small_n
        zcut = 2 * z_max if small else z_max
        ccut = min(cos_min, -0.5) if small else cos_min
        pair = np.sqrt(np.maximum(pairwise_sq_distances(x[active]), 0.0))
        typical = float(np.median(pair[np.triu_indices(m, 1)]))
        np.fill_diagonal(pair, np.inf)
        cos_z = np.full(n, nan)
        if np.isfinite(cosine).all():
            cos_z[active] = _robust_z(cosine[active], cos_spread)
        for j, i in enumerate(active):
            if norm_z[i] > zcut:
                reasons[i].append("norm_outlier")
            if math.isfinite(cosine[i]) and cosine[i] < ccut and cos_z[i] < -zcut:
                reasons[i].append("direction_outlier")
            if dist_z[i] > zcut:
                reasons[i].append("distance_outlier")
            if typical > _TINY and float(pair[j].min()) <= duplicate_tol * typical:
                reasons[i].append("near_duplicate")

    # Larger rounds have the robust z-test (and honest sites with a rare case mix can oppose
    # the others' mean there: seen with 6 of 8 sites); skipping them also saves ~3 ms a round
    # at 50 hospitals, on the validator's critical path.
    loo_cos, loo_cons = _leave_one_out(x, active if m <= loo_max_n else active[:0])
    for i in active:
        if loo_cons[i] >= loo_consensus and loo_cos[i] < loo_cos_max:
            reasons[i].append("opposes_others")

    return {
        k: RoundScore(
            norm=float(norms[i]),
            norm_z=float(norm_z[i]),
            cosine=float(cosine[i]),
            distance=float(dist[i]),
            distance_z=float(dist_z[i]),
            accepted=not reasons[i],
            reasons=tuple(reasons[i]),
            loo_cosine=float(loo_cos[i]),
            loo_consensus=float(loo_cons[i]),
        )
        for i, k in enumerate(names)
    }


def _leave_one_out(x: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per active row: cosine to the mean of the other active rows, and how much those others
    agree (median of their pairwise cosines). NaN where fewer than 3 others exist."""
    n, m = len(x), len(active)
    cos = np.full(n, float("nan"))
    cons = np.full(n, float("nan"))
    if m < 4:
        return cos, cons
    xa = x[active]
    norms = np.maximum(np.linalg.norm(xa, axis=1), _TINY)
    unit = xa / norms[:, None]
    pair = unit @ unit.T
    total = xa.sum(axis=0)
    upper = np.triu(np.ones((m, m), dtype=bool), 1)
    for j, i in enumerate(active):
        rest = (total - xa[j]) / (m - 1)
        rnorm = float(np.linalg.norm(rest))
        if rnorm > _TINY:
            cos[i] = float(xa[j] @ rest) / (norms[j] * rnorm)
        keep = np.arange(m) != j
        cons[i] = float(np.median(pair[np.ix_(keep, keep)][upper[: m - 1, : m - 1]]))
    return cos, cons
