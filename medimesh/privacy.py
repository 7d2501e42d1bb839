"""Differential privacy for MediMesh: patient-level DP-FedAvg (full-batch DP gradient descent).

**Unit protected: one patient record at one hospital, replace-one adjacency.** Neighbouring
datasets have the same number of patients at every hospital and differ in the record of one
patient. That is the adjacency that matches what MediMesh publishes: per-hospital example
counts are committed exactly at setup (and used as public denominators), so adding or removing
a patient would show in the counts and add/remove adjacency would not hold. In a DP round
every hospital computes the per-example gradient of the current global model's loss on each of
its training rows, clips each to L2 norm ``C`` and sends only the (normalised) clipped sum;
replacing one patient moves the consortium-wide sum by at most ``2C`` (two clipped gradients,
each of norm <= C): the **sensitivity is 2C** (:func:`sensitivity`).

- *central* mode: the coordinator adds ``N(0, (z * 2C)^2 I)`` once to the summed gradients;
- *local* mode: every hospital adds ``N(0, (z * 2C)^2 I)`` to its own sum before sending, so
  even the coordinator and the validator see a DP release (√hospitals times more noise in
  total).

Either way one round is one Gaussian mechanism with noise multiplier ``z`` (noise standard
deviation over sensitivity) for any single patient, and ``T`` rounds are its ``T``-fold
composition. **Sampling assumption: none** — every round uses each hospital's full training
set (no subsampling amplification is claimed). The accountant is Google's ``dp_accounting``
(PLD by default, RDP on request); ``z`` is calibrated so that the planned rounds reach exactly
the target ``(ε, δ)``, and ``δ`` must be below ``1/N`` for the ``N`` patients it protects
(:func:`check_delta`). What is *not* covered by ε: the setup round's aggregate statistics, the
held-out evaluation counts, and hyper-parameters tuned on the same data (see
``docs/privacy.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from medimesh.errors import ConfigError
from medimesh.model import Model, predict_proba

__all__ = [
    "ADJACENCY",
    "SENSITIVITY_FACTOR",
    "AccountantKind",
    "DpMode",
    "PrivacyAccountant",
    "PrivacyConfig",
    "calibrate_noise",
    "check_delta",
    "clipped_gradient_sum",
    "dp_aggregate",
    "dp_client_delta",
    "epsilon_after",
    "noise_rng",
    "noise_std",
    "sensitivity",
]

DpMode = Literal["central", "local"]
AccountantKind = Literal["pld", "rdp"]

ADJACENCY = "replace-one"
"""Neighbouring datasets: one patient's record replaced (counts are public, so not add/remove)."""
SENSITIVITY_FACTOR = 2.0
"""Replace-one moves a sum of gradients clipped to C by at most 2C."""

# Smallest / largest noise multiplier calibration will consider.
_Z_LO, _Z_HI = 0.25, 1e4


@functools.lru_cache(maxsize=4096)
def epsilon_after(
    noise_multiplier: float, rounds: int, delta: float, accountant: AccountantKind = "pld"
) -> float:
    """ε after ``rounds`` full-batch Gaussian rounds with this noise multiplier, at ``delta``.

    ``rounds = 0`` spends nothing (ε = 0). Cached: the coordinator asks before every round.
    """
    if rounds < 0 or noise_multiplier <= 0 or not 0 < delta < 1:
        raise ConfigError("epsilon_after needs rounds >= 0, noise > 0, 0 < delta < 1")
    if rounds == 0:
        return 0.0
    import dp_accounting  # type: ignore[import-untyped]
    from dp_accounting import pld, rdp

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier), rounds
    )
    acc: dp_accounting.PrivacyAccountant = (
        pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant()
    )
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    epsilon: float, delta: float, rounds: int, accountant: AccountantKind = "pld"
) -> float:
    """Smallest noise multiplier (to 1e-4 relative) whose ``rounds`` rounds stay within ε.

    Bisection on a log scale: ε is decreasing in the noise multiplier.
    """
    if epsilon <= 0 or not 0 < delta < 1 or rounds < 1:
        raise ConfigError("calibration needs epsilon > 0, 0 < delta < 1 and rounds >= 1")
    # Bracket [lo, hi] by doubling/halving from z = 1: small z is slow for PLD (its loss
    # distribution gets wide), so the search never evaluates below the floor _Z_LO.
    lo = hi = 1.0
    if epsilon_after(hi, rounds, delta, accountant) > epsilon:
        while epsilon_after(hi, rounds, delta, accountant) > epsilon:
            lo, hi = hi, hi * 2
            if hi > _Z_HI:
                raise ConfigError(
                    f"epsilon {epsilon} is unreachable in {rounds} rounds at delta {delta}"
                )
    else:
        while epsilon_after(lo, rounds, delta, accountant) <= epsilon:
            hi, lo = lo, lo / 2
            if lo < _Z_LO:
                return hi
    while hi / lo > 1.0001:
        mid = math.sqrt(lo * hi)
        if epsilon_after(mid, rounds, delta, accountant) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def sensitivity(clip_norm: float) -> float:
    """L2 sensitivity of a sum of per-patient gradients clipped to ``clip_norm`` under
    replace-one adjacency: ``2 * clip_norm``."""
    return SENSITIVITY_FACTOR * clip_norm


def noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """Standard deviation of the Gaussian noise one DP round adds to a clipped sum."""
    return noise_multiplier * sensitivity(clip_norm)


def check_delta(delta: float, n_records: int) -> None:
    """Refuse ``delta >= 1/n_records``: a mechanism that publishes one random record in full is
    (0, 1/n)-DP, so such a δ protects nobody. ``n_records`` is the number of patients the
    guarantee covers (the consortium's training patients; a hospital checks its own)."""
    if n_records < 1:
        raise ConfigError("differential privacy needs at least one training record")
    if delta >= 1.0 / n_records:
        raise ConfigError(
            f"delta {delta:g} is not below 1/N = 1/{n_records} = {1.0 / n_records:.3g}: with "
            f"{n_records} patients, publishing one patient's record in full would satisfy "
            f"(0, {1.0 / n_records:.3g})-DP; choose --delta well below 1/N (e.g. "
            f"{10 ** math.floor(math.log10(0.1 / n_records)):g})"
        )


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """A DP run: target budget, planned rounds, clipping, and the server's step.

    ``noise_multiplier = None`` means "calibrate to (epsilon, delta) over ``rounds``"; call
    :meth:`calibrated` once (the runtime does) so every actor uses the same ``z``. The server
    step is plain gradient descent by default: momentum is post-processing and allowed, but
    measured it did not help on the heart data (docs/privacy.md).
    """

    epsilon: float = 1.0
    delta: float = 1e-3
    rounds: int = 10
    mode: DpMode = "central"
    clip_norm: float = 0.5
    noise_multiplier: float | None = None
    server_lr: float = 0.5
    server_momentum: float = 0.0
    accountant: AccountantKind = "pld"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError("--epsilon must be positive")
        if not 0 < self.delta < 1:
            raise ConfigError("--delta must be in (0, 1)")
        if self.rounds < 1:
            raise ConfigError("DP rounds must be at least 1")
        if self.mode not in ("central", "local"):
            raise ConfigError(f"unknown DP mode {self.mode!r}; expected central or local")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError("DP needs a positive clip norm")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError("noise multiplier must be positive")
        if self.server_lr <= 0 or not 0 <= self.server_momentum < 1:
            raise ConfigError("server lr must be > 0 and momentum in [0, 1)")
        if self.accountant not in ("pld", "rdp"):
            raise ConfigError(f"unknown accountant {self.accountant!r}")

    @property
    def z(self) -> float:
        if self.noise_multiplier is None:
            raise ConfigError("privacy config is not calibrated: call calibrated() first")
        return self.noise_multiplier

    def calibrated(self) -> PrivacyConfig:
        """This config with the noise multiplier that spends exactly the budget in ``rounds``."""
        if self.noise_multiplier is not None:
            return self
        z = calibrate_noise(self.epsilon, self.delta, self.rounds, self.accountant)
        return dataclasses.replace(self, noise_multiplier=z)

    def epsilon_at(self, rounds: int) -> float:
        return epsilon_after(self.z, rounds, self.delta, self.accountant)


class PrivacyAccountant:
    """Counts spent rounds and answers ε so far and whether one more round fits the budget."""

    def __init__(self, config: PrivacyConfig, spent_rounds: int = 0) -> None:
        self.config = config.calibrated()
        self.rounds = spent_rounds

    @property
    def epsilon(self) -> float:
        return self.config.epsilon_at(self.rounds)

    def next_epsilon(self) -> float:
        return self.config.epsilon_at(self.rounds + 1)

    def can_spend(self) -> bool:
        """True if one more round keeps ε within the budget (tiny float slack only)."""
        return self.next_epsilon() <= self.config.epsilon * (1 + 1e-9)

    def spend(self) -> float:
        """Record one round; returns ε after it."""
        self.rounds += 1
        return self.epsilon


def noise_rng() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG (128 bits): noise nobody can predict or replay."""
    return np.random.default_rng(secrets.randbits(128))


def clipped_gradient_sum(
    model: Model, x: np.ndarray, y: np.ndarray, clip_norm: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Sum over rows of per-example cross-entropy gradients, each clipped to ``clip_norm``.

    For softmax regression the per-example gradient is ``(x_i ⊗ r_i, r_i)`` with residual
    ``r_i = p_i - onehot(y_i)``, whose norm is ``|r_i| * sqrt(|x_i|^2 + 1)``: clipping needs
    only that scalar per row, so no per-example gradient is ever materialised. Returns
    (sum over weights, sum over bias, fraction of rows that were clipped). Runs inside the
    hospital: only the sum (noised or not) leaves it.
    """
    if clip_norm <= 0:
        raise ConfigError("clip norm must be positive")
    x64 = np.asarray(x, dtype=np.float64)
    resid = predict_proba(Model(model.weights.astype(np.float64), model.bias), x64)
    resid[np.arange(len(y)), y] -= 1.0
    norms = np.linalg.norm(resid, axis=1) * np.sqrt((x64**2).sum(axis=1) + 1.0)
    factor = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))
    scaled = resid * factor[:, None]
    clipped = float(np.mean(norms > clip_norm)) if len(y) else 0.0
    return x64.T @ scaled, scaled.sum(axis=0), clipped


def dp_client_delta(
    model: Model,
    x: np.ndarray,
    y: np.ndarray,
    clip_norm: float,
    mode: DpMode,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """What a hospital sends in a DP round: ``-(clipped sum [+ local noise]) / n``.

    The sign makes it a descent direction like an ordinary delta; dividing by the (public,
    committed) count ``n`` keeps central-mode updates inside the L2 ball of radius ``C``, which
    the validator checks. In local mode ``N(0, (z * 2C)^2)`` is added to the sum first.
    """
    n = len(y)
    if n == 0:
        raise ConfigError("a DP update needs at least one training row")
    gw, gb, _ = clipped_gradient_sum(model, x, y, clip_norm)
    if mode == "local":
        g = rng if rng is not None else noise_rng()
        std = noise_std(noise_multiplier, clip_norm)
        gw = gw + g.normal(0.0, std, gw.shape)
        gb = gb + g.normal(0.0, std, gb.shape)
    return -gw / n, -gb / n


def dp_aggregate(
    updates: Sequence[np.ndarray],
    counts: Sequence[int],
    config: PrivacyConfig,
    base: Model,
    l2: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Coordinator side of a DP round: the noisy mean descent direction (flattened).

    ``sum_i n_i u_i`` recovers ``-sum of clipped gradients``; central mode adds
    ``N(0, (z * 2C)^2)`` to that sum once; dividing by the public total ``N`` gives the noisy mean
    gradient. The L2 term ``l2 * w`` depends on the model only (no patient), so adding it is
    post-processing.
    """
    if not updates or len(updates) != len(counts):
        raise ConfigError("DP aggregation needs one count per update and at least one update")
    total = float(sum(counts))
    if total <= 0:
        raise ConfigError("DP aggregation needs a positive total example count")
    acc = np.zeros_like(np.asarray(updates[0], dtype=np.float64).ravel())
    for u, n in zip(updates, counts, strict=True):
        acc += float(n) * np.asarray(u, dtype=np.float64).ravel()
    if config.mode == "central":
        g = rng if rng is not None else noise_rng()
        acc += g.normal(0.0, noise_std(config.z, config.clip_norm), acc.shape)
    acc /= total
    if l2 > 0:
        decay = np.concatenate([(l2 * base.weights).ravel(), np.zeros(base.n_classes)])
        acc -= decay
    return acc
