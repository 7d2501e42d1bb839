"""Hospital behaviours for robustness experiments: pure functions chosen by name.

:func:`attack_update` turns the update an honest site *would* send into what a malicious site
sends. Nothing is mutated; every call returns a new array. Label flipping is a data attack,
applied with :func:`flip_labels` before local training (its ``attack_update`` is the identity).
Threat model and detectability: ``docs/byzantine.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from medimesh.errors import ConfigError

__all__ = ["ATTACKS", "alie_z", "attack_update", "drift_direction", "flip_labels"]

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
)

_DRIFT_SEED = 0xBAD5EED


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
    raise ConfigError(f"unknown attack {name!r}; have {list(ATTACKS)}")
