"""Hospital behaviours for robustness experiments: pure functions chosen by name.

:func:`attack_update` turns the update an honest site *would* send into what a malicious site
sends. Nothing is mutated; every call returns a new array. Label flipping is a data attack,
applied with :func:`flip_labels` before local training (its ``attack_update`` is the identity).
Threat model and detectability: ``docs/byzantine.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

from medimesh.errors import ConfigError

__all__ = [
    "ATTACKS",
    "COLLUDING",
    "FRAMING",
    "alie_z",
    "attack_update",
    "drift_direction",
    "flip_labels",
    "framing_victim",
    "shejwalkar_gamma",
]

ATTACKS = (
    "honest",
    "sign_flip",
    "scaling",
    "gaussian_noise",
    "label_flip",
    "alie",
    "ipm",
    "free_rider",
    "backdoor_drift",
    "min_max",
    "min_sum",
    "relay",
    "frame_duplicate",
    "frame_oppose",
)
# Attacks that need the colluding sites' honest updates (shared over the attackers' channel).
COLLUDING = frozenset({"alie", "ipm", "min_max", "min_sum", "relay", "frame_oppose"})
# Attacks that need an honest victim's update (the attackers' channel predicts it).
FRAMING = frozenset({"frame_duplicate", "frame_oppose"})

_DRIFT_SEED = 0xBAD5EED
_TINY = 1e-12


def alie_z(n_clients: int, n_byzantine: int) -> float:
    """Baruch et al. 2019's z_max: ``s = floor(n/2 + 1) - f``; ``z = Phi^-1((n - s) / n)``.

    s is how many honest sites the attacker needs "on its side" for a majority; z is the
    largest shift (in per-coordinate standard deviations) that still looks like at least s
    honest sites. For n = 10, f = 3: s = 3, z = Phi^-1(0.7) ~= 0.52.
    """
    if n_clients < 1 or not 0 <= n_byzantine <= n_clients:
        raise ConfigError(f"need 0 <= n_byzantine <= n_clients, got {n_byzantine}/{n_clients}")
    s = math.floor(n_clients / 2 + 1) - n_byzantine
    p = min(max((n_clients - s) / n_clients, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


def drift_direction(size: int) -> np.ndarray:
    """The fixed unit vector backdoor drift pushes along (same for every round and site)."""
    v = np.random.default_rng(_DRIFT_SEED).standard_normal(size)
    return np.asarray(v / np.linalg.norm(v))


def flip_labels(
    y: np.ndarray, n_classes: int, rng: np.random.Generator, mode: str = "reverse"
) -> np.ndarray:
    """Label flipping (Fang et al. 2020; Tolpegin et al. 2020), applied before local training.

    ``"reverse"`` maps label l to ``n_classes - 1 - l`` (deterministic; rng unused);
    ``"random"`` replaces every label by a uniformly chosen *different* class.
    Returns a new array of the same dtype.
    """
    y = np.asarray(y)
    if n_classes < 2:
        raise ConfigError("label flipping needs at least two classes")
    if mode == "reverse":
        return np.asarray(n_classes - 1 - y).astype(y.dtype)
    if mode == "random":
        shift = rng.integers(1, n_classes, size=y.shape)
        return np.asarray((y + shift) % n_classes).astype(y.dtype)
    raise ConfigError(f'flip mode must be "reverse" or "random", not {mode!r}')


def attack_update(
    name: str,
    honest: np.ndarray,
    *,
    round_: int,
    rng: np.random.Generator,
    colluders: Sequence[np.ndarray] = (),
    scale: float = 10.0,
    noise: float = 3.0,
    z: float | None = None,
    n_clients: int | None = None,
    n_byzantine: int | None = None,
    epsilon: float = 0.5,
    previous: np.ndarray | None = None,
    drift: float = 0.05,
    deviation: str = "std",
    trajectory: np.ndarray | None = None,
    margin: float = 0.9,
    victim: np.ndarray | None = None,
    jitter: float = 1e-5,
    cap: float = 50.0,
    cap_fraction: float = 0.8,
    agree: float = 0.3,
) -> np.ndarray:
    """The vector a site following behaviour ``name`` sends instead of ``honest``.

    - ``honest``: ``honest`` unchanged (a copy).
    - ``sign_flip``: ``-honest`` (sign-flipping attack, e.g. Li et al. 2019 "RSA"; Allen-Zhu
      et al. 2021). Same norm, opposite direction.
    - ``scaling``: ``scale * honest`` (default x10; "boosting" of Bhagoji et al. 2019 and the
      model replacement of Bagdasaryan et al. 2020).
    - ``gaussian_noise``: a pure Gaussian vector whose expected norm is ``noise`` (default 3)
      times the honest norm (the Gaussian Byzantine worker of Blanchard et al. 2017).
    - ``label_flip``: identity here; the site trains on :func:`flip_labels` labels instead.
    - ``alie``: "A little is enough" (Baruch et al. 2019): ``mu - z * sigma`` per coordinate,
      mean and standard deviation over ``colluders`` (the colluding sites' honest updates,
      this one included; ``honest`` alone if empty). ``z`` defaults to :func:`alie_z` of
      ``n_clients`` and ``n_byzantine`` when both are given, else 1.0. All colluders send the
      same vector.
    - ``ipm``: inner-product manipulation (Xie, Koyejo, Gupta 2019): ``-epsilon * mean`` of the
      colluders' honest updates. Default ``epsilon = 0.5``: small epsilon keeps the vector
      short and near the others (the regime in which the paper breaks Krum and the median,
      while the mean still moves against the honest direction when f/n is large).
    - ``free_rider``: zeros, or a copy of ``previous`` (the last aggregate) when given: the
      site contributes nothing but still receives the model.
    - ``backdoor_drift``: ``honest + drift * round_ * |honest| * d`` with ``d`` the fixed unit
      vector :func:`drift_direction`: a small consistent bias that grows linearly with the
      round, in the spirit of stealthy, norm-bounded model poisoning (Bhagoji et al. 2019;
      Sun et al. 2019 "Can you really backdoor FL?").
    - ``min_max`` / ``min_sum``: the AGR-agnostic attacks of Shejwalkar & Houmansadr (NDSS 2021,
      "Manipulating the Byzantine"), partial-knowledge form (the benign updates are the
      ``colluders``' honest ones): ``mu + gamma * p`` with ``p = -std`` (``deviation="std"``;
      ``"unit_vec"``: ``-mu/|mu|``, ``"sign"``: ``-sign(mu)``) and the largest ``gamma``
      (:func:`shejwalkar_gamma`) whose max distance (min-max) or sum of squared distances
      (min-sum) to the benign updates stays within the largest such value among them. All
      colluders send it. One colluder has no spread to hide in: ``gamma = 0``, it sends ``mu``.
    - ``relay``: a time-coupled attack on clipping around the previous aggregate. With centre
      ``c = previous`` (the last global step) and radius ``tau`` = the median distance of the
      colluders' honest updates to ``c`` (what centered clipping with ``tau="median"`` would
      use, estimated from what the attackers hold), it sends ``c - margin * tau * t/|t|``,
      with ``t = trajectory`` (the model's displacement since the attacker's first round,
      i.e. the sum of all steps it saw; else ``c``): just inside the radius, so never
      clipped, and always pointing back towards the starting model, so the pull accumulates
      round after round instead of cancelling. Without a previous aggregate (round 1) there
      is no centre: it sends its honest update (which also keeps it clear of the round-1
      tests that catch a reversed update). Related: the relocated orthogonal perturbation
      (ROP) of Ozfatura, Ozfatura, Kupcu, Gunduz ("Byzantines can also learn from history:
      fall of centered clipping in federated learning", IEEE TIFS 2024, arXiv:2208.09894),
      which also sits at CC's radius around its reference but perturbs orthogonally to it;
      and the time-coupled attacks that motivate history in Karimireddy, He, Jaggi (ICML
      2021, "Learning from history for Byzantine robust optimization").
    - ``frame_duplicate``: a framing attack: ``victim`` (an honest site's update, which the
      attackers' side channel predicts) plus a random jitter of norm ``jitter * |victim|``,
      far inside any near-duplicate tolerance. A validator that rejects both members of a
      near-identical pair then excludes the honest victim along with the attacker.
    - ``frame_oppose``: a framing attack on the leave-one-out test: a vector of norm
      ``cap_fraction * cap`` (0.8 x the consortium's update-norm bound, 50 -> 40, so it still
      passes the protocol check) whose cosine to ``victim`` is ``-cos(theta)`` and whose
      cosine to the colluders' honest mean (a stand-in for the other sites) is ``agree``.
      Its norm dominates the mean of "the others" the victim is compared with, so the
      victim appears to oppose a consensus, while the attacker still agrees with the others
      enough (``agree`` 0.3 > the 0.2 consensus gate) for that consensus to count. Same
      spirit as the Sybil/framing concerns of reputation systems; no published reference
      attack on leave-one-out scoring that we know of.
    """
    h = np.asarray(honest, dtype=np.float64)
    if name in ("honest", "label_flip"):
        return h.copy()
    if name == "sign_flip":
        return -h
    if name == "scaling":
        return scale * h
    if name == "gaussian_noise":
        sigma = noise * float(np.linalg.norm(h)) / math.sqrt(max(h.size, 1))
        return np.asarray(rng.normal(0.0, sigma, size=h.shape))
    if name in ("alie", "ipm"):
        group = np.stack([np.asarray(c, dtype=np.float64) for c in colluders] or [h])
        if group.shape[1:] != h.shape:
            raise ConfigError("colluders' updates must have the honest update's shape")
        mu = group.mean(axis=0)
        if name == "ipm":
            return np.asarray(-epsilon * mu)
        if z is None:
            z = alie_z(n_clients, n_byzantine) if n_clients and n_byzantine is not None else 1.0
        return np.asarray(mu - z * group.std(axis=0))
    if name == "free_rider":
        if previous is None:
            return np.zeros_like(h)
        return np.asarray(previous, dtype=np.float64).reshape(h.shape).copy()
    if name == "backdoor_drift":
        if round_ < 0:
            raise ConfigError(f"round_ must be >= 0, not {round_}")
        bias = drift * round_ * float(np.linalg.norm(h)) * drift_direction(h.size)
        return h + bias.reshape(h.shape)
    if name in ("min_max", "min_sum"):
        group = _group(colluders, h)
        mu = group.mean(axis=0)
        p = -_deviation(group, deviation)
        return np.asarray(mu + shejwalkar_gamma(group, p, name) * p)
    if name == "relay":
        return _relay(h, _group(colluders, h), previous, trajectory, margin)
    if name == "frame_duplicate":
        v = _victim(victim, h)
        e = rng.standard_normal(v.shape)
        return np.asarray(v + e * jitter * float(np.linalg.norm(v)) / max(
            float(np.linalg.norm(e)), _TINY))
    if name == "frame_oppose":
        return _frame_oppose(_victim(victim, h), _group(colluders, h), rng, cap * cap_fraction,
                             agree)
    raise ConfigError(f"unknown attack {name!r}; have {list(ATTACKS)}")


def framing_victim(sites: Sequence[str], behaviours: Mapping[str, str]) -> str | None:
    """The honest site a framing attack targets: the first honest site in roster order.

    Deterministic, so the runtime (which gives the attackers' side channel the victim) and a
    benchmark (which checks whether the victim was excluded) agree without a config field.
    None when nobody frames or no site is honest.
    """
    if not any(b in FRAMING for b in behaviours.values()):
        return None
    return next((s for s in sites if behaviours.get(s, "honest") == "honest"), None)


def shejwalkar_gamma(
    benign: np.ndarray, perturbation: np.ndarray, objective: str, *, rtol: float = 1e-9
) -> float:
    """The largest ``gamma >= 0`` keeping ``mean(benign) + gamma * perturbation`` inside the
    benign spread (Shejwalkar & Houmansadr 2021), found by bisection.

    ``"min_max"``: ``max_j |m - g_j|^2 <= max_{i,j} |g_i - g_j|^2``;
    ``"min_sum"``: ``sum_j |m - g_j|^2 <= max_i sum_j |g_i - g_j|^2``.
    Both sides are convex in gamma and hold at gamma = 0 (the mean lies inside the benign
    updates), so the feasible set is an interval [0, gamma*]: the bracket doubles until it
    fails, then bisection narrows it to ``rtol``; the returned gamma always satisfies the
    constraint. Zero when there is no spread (fewer than two benign updates) or no direction.
    """
    if objective not in ("min_max", "min_sum"):
        raise ConfigError(f'objective must be "min_max" or "min_sum", not {objective!r}')
    g = np.asarray(benign, dtype=np.float64)
    g = g.reshape(len(g), -1)
    p = np.asarray(perturbation, dtype=np.float64).ravel()
    if p.shape != g.shape[1:]:
        raise ConfigError("the perturbation must have the benign updates' size")
    pn = float(np.linalg.norm(p))
    if len(g) < 2 or pn <= _TINY:
        return 0.0
    mu = g.mean(axis=0)
    sq = ((g[:, None, :] - g[None, :, :]) ** 2).sum(axis=2)
    bound = float(sq.max()) if objective == "min_max" else float(sq.sum(axis=1).max())
    if bound <= _TINY:
        return 0.0

    def fits(gamma: float) -> bool:
        d = ((mu + gamma * p - g) ** 2).sum(axis=1)
        return float(d.max() if objective == "min_max" else d.sum()) <= bound

    lo, hi = 0.0, math.sqrt(bound) / pn
    while fits(hi):  # terminates: the left side grows like gamma^2
        lo, hi = hi, 2 * hi
    while hi - lo > rtol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo



def _group(colluders: Sequence[np.ndarray], h: np.ndarray) -> np.ndarray:
    """The colluders' honest updates as rows (``honest`` alone if none were shared)."""
    group = np.stack([np.asarray(c, dtype=np.float64) for c in colluders] or [h])
    if group.shape[1:] != h.shape:
        raise ConfigError("colluders' updates must have the honest update's shape")
    return group


def _victim(victim: np.ndarray | None, h: np.ndarray) -> np.ndarray:
    if victim is None:
        raise ConfigError("a framing attack needs the victim's update")
    v = np.asarray(victim, dtype=np.float64)
    if v.shape != h.shape:
        raise ConfigError("the victim's update must have the honest update's shape")
    return v


def _deviation(group: np.ndarray, kind: str) -> np.ndarray:
    """Shejwalkar & Houmansadr's perturbation directions (the attack adds minus this)."""
    mu = group.mean(axis=0)
    if kind == "std":
        return np.asarray(group.std(axis=0))
    if kind == "unit_vec":
        n = float(np.linalg.norm(mu))
        return np.asarray(mu / n) if n > _TINY else np.zeros_like(mu)
    if kind == "sign":
        return np.asarray(np.sign(mu))
    raise ConfigError(f'deviation must be "std", "unit_vec" or "sign", not {kind!r}')


def _relay(
    h: np.ndarray,
    group: np.ndarray,
    previous: np.ndarray | None,
    trajectory: np.ndarray | None,
    margin: float,
) -> np.ndarray:
    if not 0 < margin <= 1:
        raise ConfigError(f"relay margin must be in (0, 1], not {margin}")
    if previous is None:
        return h.copy()
    center = np.asarray(previous, np.float64).reshape(h.shape)
    radius = float(np.median(np.linalg.norm((group - center).reshape(len(group), -1), axis=1)))
    for t in (trajectory, center):
        if t is not None and float(np.linalg.norm(t)) > _TINY:
            push = np.asarray(t, dtype=np.float64).reshape(h.shape)
            return np.asarray(center - margin * radius * push / float(np.linalg.norm(push)))
    return center.copy()


def _frame_oppose(
    v: np.ndarray, group: np.ndarray, rng: np.random.Generator, norm: float, agree: float
) -> np.ndarray:
    """``norm * (-cos(theta) v^ + sin(theta) o_perp)`` with cosine ``agree`` to the others.

    With ``rho = cos(v, others) = sin(alpha)``, the cosine to the others is
    ``sin(theta - alpha)``, so ``theta = alpha + asin(agree)``; the cosine to the victim is
    then ``-cos(theta)`` (the more the victim agrees with the others, the less it can be made
    to oppose them while the attacker still agrees with them).
    """
    if not -1 < agree < 1 or norm <= 0:
        raise ConfigError("frame_oppose needs -1 < agree < 1 and a positive norm")
    vn = float(np.linalg.norm(v))
    if vn <= _TINY:
        raise ConfigError("frame_oppose needs a non-zero victim update")
    vh = (v / vn).ravel()
    others = group.mean(axis=0).ravel()
    rho = float(others @ vh) / max(float(np.linalg.norm(others)), _TINY)
    perp = others - (others @ vh) * vh
    if float(np.linalg.norm(perp)) <= 1e-9 * max(float(np.linalg.norm(others)), 1.0):
        perp = rng.standard_normal(vh.shape)  # the others are parallel to the victim
        perp -= (perp @ vh) * vh
        rho = float(np.clip(rho, -1.0, 1.0))
    perp /= float(np.linalg.norm(perp))
    theta = min(max(math.asin(float(np.clip(rho, -1.0, 1.0))) + math.asin(agree), 0.0), math.pi)
    out = norm * (-math.cos(theta) * vh + math.sin(theta) * perp)
    return np.asarray(out.reshape(v.shape))
