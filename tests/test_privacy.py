"""Differential privacy: accountant cross-checks, calibration, clipping, noise, wire format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medimesh.errors import ConfigError
from medimesh.model import Model, init_model, loss_and_grad
from medimesh.privacy import (
    ADJACENCY,
    PrivacyAccountant,
    PrivacyConfig,
    calibrate_noise,
    check_delta,
    clipped_gradient_sum,
    dp_aggregate,
    dp_client_delta,
    epsilon_after,
    sensitivity,
)
from medimesh.protocol import RoundStart, decode_arrays
from medimesh.rounds import RoundMetrics

# ---------------------------------------------------------------- accountant cross-checks


def _classic_rdp_epsilon(noise: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's RDP curve with the conversion TF Privacy used in 2019.

    eps = min_a RDP(a) + log(1/delta) / (a - 1) (Mironov 2017, Prop. 3), over TF Privacy's
    default orders. dp_accounting's own get_epsilon uses a tighter conversion.
    """
    import dp_accounting  # type: ignore[import-untyped]
    from dp_accounting import rdp

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = rdp.RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise))
    acc.compose(event, steps)
    curve = np.asarray(acc._rdp)
    return float(np.min(curve - math.log(delta) / (np.asarray(orders) - 1)))


@pytest.mark.parametrize(
    ("noise", "epochs", "published"),
    [(1.12, 60, 2.92), (1.2, 10, 1.20), (0.6, 30, 9.74)],
)
def test_rdp_reproduces_tensorflow_privacy_published_table(
    noise: float, epochs: int, published: float
) -> None:
    """TF Privacy tutorials/README.md, "Select Parameters": MNIST DP-SGD, N = 60000,
    batch 256 (Poisson q = 256/60000), delta = 1e-5 -> eps 2.92 / 1.20 / 9.74."""
    steps = epochs * 60000 // 256
    eps = _classic_rdp_epsilon(noise, 256 / 60000, steps, 1e-5)
    assert eps == pytest.approx(published, abs=0.03)


def _exact_gaussian_epsilon(noise: float, rounds: int, delta: float) -> float:
    """Exact eps of `rounds` composed Gaussian mechanisms (sensitivity 1, std = noise).

    The composition is mu-GDP with mu = sqrt(T) / noise (Dong, Roth & Su 2022, Cor. 3.3) and
    mu-GDP is (eps, delta)-DP iff delta >= Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    (Balle & Wang 2018, Thm. 8; Dong et al. Cor. 2.13). Solved for eps here.
    """
    mu = math.sqrt(rounds) / noise

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    def gap(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) - delta

    lo, hi = 0.0, 100.0  # gap decreases in eps: bisection to 1e-9
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return hi


@pytest.mark.parametrize(("noise", "rounds"), [(8.0, 10), (2.0, 1), (4.0, 15), (30.0, 5)])
def test_pld_accountant_matches_the_analytic_gaussian_mechanism(noise: float, rounds: int) -> None:
    """Our accountant (PLD) agrees with the closed form to 0.01 and never under-reports."""
    exact = _exact_gaussian_epsilon(noise, rounds, 1e-3)
    pld = epsilon_after(noise, rounds, 1e-3, "pld")
    assert exact - 1e-6 <= pld <= exact + 0.01


def test_rdp_is_a_looser_upper_bound_than_pld() -> None:
    """RDP's conversion loses a little for a few Gaussian rounds; both bound the truth."""
    exact = _exact_gaussian_epsilon(8.0, 10, 1e-3)
    assert epsilon_after(8.0, 10, 1e-3, "rdp") >= epsilon_after(8.0, 10, 1e-3, "pld") >= exact


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    """Composition spends more; more noise spends less; zero rounds spend nothing."""
    assert epsilon_after(8.0, 0, 1e-3) == 0.0
    eps = [epsilon_after(8.0, t, 1e-3) for t in range(1, 6)]
    assert eps == sorted(eps) and len(set(eps)) == 5
    assert epsilon_after(16.0, 5, 1e-3) < eps[-1]


def test_calibration_spends_exactly_the_budget_over_the_planned_rounds() -> None:
    """The calibrated z reaches eps <= target, and 0.1 % less noise would exceed it."""
    z = calibrate_noise(1.0, 1e-3, 10)
    assert epsilon_after(z, 10, 1e-3) <= 1.0
    assert epsilon_after(z * 0.999, 10, 1e-3) > 1.0


def test_unreachable_or_invalid_budgets_are_config_errors() -> None:
    """Nonsense budgets fail early with ConfigError, never a silent default."""
    with pytest.raises(ConfigError):
        calibrate_noise(0.0, 1e-3, 10)
    with pytest.raises(ConfigError):
        PrivacyConfig(epsilon=-1.0)
    with pytest.raises(ConfigError):
        PrivacyConfig(delta=1.0)
    with pytest.raises(ConfigError):
        PrivacyConfig(mode="global")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PrivacyConfig(clip_norm=0.0)
    with pytest.raises(ConfigError):
        _ = PrivacyConfig().z  # not calibrated yet


def test_accountant_refuses_the_round_that_would_exceed_the_budget() -> None:
    """After the planned rounds the next one no longer fits; eps is reported per round."""
    acc = PrivacyAccountant(PrivacyConfig(epsilon=1.0, delta=1e-3, rounds=3))
    seen = []
    while acc.can_spend():
        seen.append(acc.spend())
    assert len(seen) == 3
    assert seen == sorted(seen) and seen[-1] <= 1.0
    assert acc.next_epsilon() > 1.0


# ------------------------------------------------------------------------ clipping and noise


def _rows(seed: int, n: int = 40, d: int = 5, k: int = 3) -> tuple[Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2.0, (n, d))
    y = rng.integers(0, k, n)
    m = init_model(d, k)
    model = Model(rng.normal(0, 0.5, m.weights.shape), rng.normal(0, 0.5, k))
    return model, x, y


def test_clipped_sum_equals_explicit_per_example_clipping() -> None:
    """The closed-form per-row norm gives the same result as materialised per-row gradients."""
    model, x, y = _rows(0)
    c = 0.7
    sw, sb, frac = clipped_gradient_sum(model, x, y, c)
    ew, eb, clipped = np.zeros_like(model.weights), np.zeros_like(model.bias), 0
    for i in range(len(y)):
        _, gw, gb = loss_and_grad(model, x[i : i + 1], y[i : i + 1], l2=0.0)
        g = np.concatenate([gw.ravel(), gb])
        scale = min(1.0, c / float(np.linalg.norm(g)))
        clipped += scale < 1.0
        ew += gw * scale
        eb += gb * scale
    assert np.allclose(sw, ew) and np.allclose(sb, eb)
    assert frac == pytest.approx(clipped / len(y))


def test_one_patient_moves_the_clipped_sum_by_at_most_c() -> None:
    """Sensitivity under add/remove-one: what the Gaussian noise is calibrated to."""
    model, x, y = _rows(1)
    c = 0.5
    full = np.concatenate([a.ravel() for a in clipped_gradient_sum(model, x, y, c)[:2]])
    for i in (0, 7, 39):
        keep = np.arange(len(y)) != i
        less = clipped_gradient_sum(model, x[keep], y[keep], c)
        diff = full - np.concatenate([less[0].ravel(), less[1]])
        assert float(np.linalg.norm(diff)) <= c + 1e-9


def test_one_replaced_patient_moves_the_clipped_sum_by_at_most_2c() -> None:
    """Sensitivity under replace-one (the adjacency protected, counts being public): <= 2C,
    and the noise is calibrated to it."""
    model, x, y = _rows(1)
    c = 0.5
    full = np.concatenate([a.ravel() for a in clipped_gradient_sum(model, x, y, c)[:2]])
    worst = 0.0
    for i in (0, 7, 39):
        x2, y2 = x.copy(), y.copy()
        x2[i] = -50.0 * x[i]  # a very different patient in the same slot
        y2[i] = (y[i] + 1) % model.n_classes
        other = clipped_gradient_sum(model, x2, y2, c)
        diff = full - np.concatenate([other[0].ravel(), other[1]])
        worst = max(worst, float(np.linalg.norm(diff)))
        assert worst <= 2 * c + 1e-9
    assert worst > c  # replace-one can exceed the add/remove bound C: 2C is needed
    assert sensitivity(c) == 2 * c and ADJACENCY == "replace-one"


def test_delta_at_or_above_one_over_n_is_refused() -> None:
    """δ >= 1/N protects nobody (publishing one random record is (0, 1/N)-DP)."""
    check_delta(1e-3, 999)
    with pytest.raises(ConfigError, match="not below 1/N"):
        check_delta(1e-3, 1000)
    with pytest.raises(ConfigError, match="not below 1/N"):
        check_delta(1e-3, 1257)


def test_central_update_lies_in_the_clip_ball_local_update_is_noised() -> None:
    """Central: -sum/n has norm <= C (the validator checks it); local adds N(0,(z 2C)^2)."""
    model, x, y = _rows(2)
    dw, db = dp_client_delta(model, x, y, 0.5, "central", 8.0)
    assert math.hypot(float(np.linalg.norm(dw)), float(np.linalg.norm(db))) <= 0.5 + 1e-12
    lw, lb = dp_client_delta(model, x, y, 0.5, "local", 8.0, np.random.default_rng(0))
    noise = np.concatenate([(lw - dw).ravel(), lb - db]) * len(y)
    assert float(np.std(noise)) == pytest.approx(8.0 * 2 * 0.5, rel=0.35)


def test_central_aggregate_has_noise_std_z_2c_over_total() -> None:
    """dp_aggregate adds N(0, (z 2C)^2) to the weighted sum once, then divides by N."""
    cfg = PrivacyConfig(clip_norm=0.5, noise_multiplier=8.0)
    base = init_model(20, 10)
    ups = [np.zeros(210), np.zeros(210)]
    rng = np.random.default_rng(3)
    draws = np.stack([dp_aggregate(ups, [100, 300], cfg, base, rng=rng) for _ in range(50)])
    assert float(draws.std()) == pytest.approx(8.0 * 2 * 0.5 / 400, rel=0.05)
    assert abs(float(draws.mean())) < 0.001


def test_aggregate_is_the_example_weighted_mean_without_noise_in_local_mode() -> None:
    """Local mode: the coordinator adds nothing; weights are the committed counts."""
    cfg = PrivacyConfig(mode="local", noise_multiplier=8.0)
    base = init_model(1, 2)
    out = dp_aggregate([np.ones(4), 3 * np.ones(4)], [1, 3], cfg, base)
    assert np.allclose(out, 2.5)


# ------------------------------------------------------------------ wire format and metrics


def test_round_start_dp_fields_are_optional_on_the_wire() -> None:
    """Non-DP RoundStarts carry no DP keys (unchanged bytes); DP ones round-trip."""
    args = (1, "h", 0.0, np.zeros((2, 2), np.float32), np.zeros(2, np.float32), 1, 1.0, 0.0,
            0.0, 0.0, {"a": 3})
    plain = RoundStart(*args)
    meta, _ = decode_arrays(plain.to_payload())
    assert "dp_mode" not in meta and "dp_noise_multiplier" not in meta
    assert RoundStart.from_payload(plain.to_payload()).dp_mode == ""
    dp = RoundStart(*args, "central", 8.25)
    back = RoundStart.from_payload(dp.to_payload())
    assert (back.dp_mode, back.dp_noise_multiplier) == ("central", 8.25)


def test_round_metrics_carry_epsilon_only_when_dp_is_on() -> None:
    """/rounds and the audit show (eps, delta) for DP rounds; other rows keep their shape."""
    base = dict(round=1, model_hash="m", parent_hash="p", accepted=1, rejected=0, reasons={},
                late=0, top1=0.5, top3=1.0, loss=0.1, n_eval=3, evaluated_by=1, duration_s=0.1,
                bytes_routed=10, phases_ms={})
    assert "epsilon" not in RoundMetrics(**base).to_dict()  # type: ignore[arg-type]
    row = RoundMetrics(**base, epsilon=0.4, delta=1e-3).to_dict()  # type: ignore[arg-type]
    assert (row["epsilon"], row["delta"]) == (0.4, 1e-3)
