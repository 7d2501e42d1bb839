"""Byzantine-robust aggregation, cross-update scoring and attack behaviours."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medimesh.aggregation import (
    AGGREGATORS,
    CLEAN_CLIP_MULTIPLE,
    DEFAULT,
    Aggregator,
    CenteredClipping,
    centered_clip,
    centered_clipping,
    clipped_trimmed_mean,
    coordinate_median,
    fedavg,
    make_aggregator,
    multi_krum,
    norm_clipping,
    trimmed_mean,
)
from medimesh.attacks import ATTACKS, alie_z, attack_update, drift_direction, flip_labels
from medimesh.errors import ConfigError

NAMES = (
    "fedavg",
    "median",
    "trimmed_mean",
    "multi_krum",
    "norm_clipping",
    "centered_clipping",
    "clipped_trimmed_mean",
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def _rules() -> dict[str, Aggregator]:
    rules = dict(AGGREGATORS)
    rules.update(
        {
            "trimmed_mean(trim=1)": trimmed_mean(trim=1),
            "multi_krum(f=0,m=1)": multi_krum(f=0, m=1),
            "norm_clipping(2.0)": norm_clipping(2.0),
            "centered_clipping(1.0, 5)": centered_clipping(1.0, 5),
            "history_cc": functools.partial(CenteredClipping(0.5, 2), center=np.zeros(3)),
        }
    )
    return rules


# ---------------------------------------------------------------- aggregation rules


@settings(deadline=None)
@given(st.data(), st.integers(1, 9), st.integers(1, 4))
def test_median_ignores_fewer_than_half_arbitrary_updates(
    data: st.DataObject, n: int, dim: int
) -> None:
    """With f < n/2 arbitrary updates every coordinate stays within the honest range."""
    f = data.draw(st.integers(0, (n - 1) // 2))
    vec = st.lists(finite, min_size=dim, max_size=dim)
    honest = [np.array(v) for v in data.draw(st.lists(vec, min_size=n - f, max_size=n - f))]
    wild = st.floats(-1e12, 1e12, allow_nan=False)
    byz = [
        np.array(v)
        for v in data.draw(
            st.lists(st.lists(wild, min_size=dim, max_size=dim), min_size=f, max_size=f)
        )
    ]
    ups = data.draw(st.permutations(honest + byz))
    out = coordinate_median(ups, [1.0] * n)
    h = np.stack(honest)
    assert np.all(out >= h.min(axis=0)) and np.all(out <= h.max(axis=0))


def test_trimmed_mean_hand_case() -> None:
    """beta = 0.2 of n = 5 trims one value per side per coordinate."""
    ups = [
        np.array([1.0, -50.0]),
        np.array([2.0, 0.0]),
        np.array([3.0, 1.0]),
        np.array([4.0, 2.0]),
        np.array([100.0, 3.0]),
    ]
    out = trimmed_mean(0.2)(ups, [1, 1, 1, 1, 1])
    assert np.allclose(out, [3.0, 1.0])
    assert np.allclose(trimmed_mean(0.0)(ups, [1] * 5), np.mean(ups, axis=0))
    with pytest.raises(ConfigError, match="2\\*2 < n = 4"):
        trimmed_mean(trim=2)(ups[:4], [1] * 4)
    with pytest.raises(ConfigError):
        trimmed_mean(0.5)


def test_multi_krum_selects_the_honest_cluster() -> None:
    """Two far-away attackers among seven clustered updates are never selected."""
    rng = np.random.default_rng(3)
    honest = [np.array([1.0, 1.0]) + 0.05 * rng.standard_normal(2) for _ in range(7)]
    byz = [np.array([100.0, -100.0]), np.array([90.0, -80.0])]
    ups, ws = honest + byz, [1.0] * 9
    out = multi_krum(f=2)(ups, ws)
    assert np.allclose(out, np.mean(honest, axis=0))
    krum = multi_krum(f=2, m=1)(ups, ws)
    assert any(np.array_equal(krum, h) for h in honest)
    assert make_aggregator("multi_krum", n_byzantine=2)(ups, ws) == pytest.approx(out)


def test_multi_krum_refuses_too_few_updates() -> None:
    """n <= 2f + 2 (or m > n - f) is a ConfigError naming the requirement."""
    ups = [np.full(2, float(i)) for i in range(6)]
    with pytest.raises(ConfigError, match="n > 2f \\+ 2"):
        multi_krum(f=2)(ups, [1.0] * 6)
    with pytest.raises(ConfigError, match="m = 6"):
        multi_krum(f=2, m=6)([*ups, ups[0]], [1.0] * 7)
    with pytest.raises(ConfigError):
        AGGREGATORS["multi_krum"](ups[:2], [1.0, 1.0])


def test_norm_clipping_bounds_a_huge_update() -> None:
    """A 1e6-norm update moves the clipped mean by at most its weight times tau."""
    honest = [
        np.array([1.0, 0.0]),
        np.array([0.0, 1.0]),
        np.array([0.6, 0.8]),
        np.array([0.8, 0.6]),
    ]
    huge = np.array([1e6, -1e6])
    ws = [1.0] * 5
    out = norm_clipping(1.0)([*honest, huge], ws)
    assert np.linalg.norm(out) <= 1.0 + 1e-12
    base = np.mean(honest, axis=0) * 4 / 5
    assert np.linalg.norm(out - base) <= 1.0 / 5 + 1e-12
    med = norm_clipping("median")([*honest, huge], ws)
    assert np.linalg.norm(med - base) <= 1.0 / 5 + 1e-12  # median norm of the round is 1
    assert np.linalg.norm(fedavg([*honest, huge], ws)) > 1e5
    with pytest.raises(ConfigError):
        norm_clipping(0.0)
    with pytest.raises(ConfigError):
        norm_clipping("mean")  # type: ignore[arg-type]


@settings(deadline=None)
@given(
    st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=7),
    st.lists(finite, min_size=3, max_size=3),
    st.floats(0.01, 100.0),
    st.integers(1, 6),
)
def test_centered_clipping_stays_within_tau_times_iterations(
    rows: list[list[float]], center: list[float], tau: float, iterations: int
) -> None:
    """|result - center| <= tau * iterations, whatever the updates."""
    ups = [np.array(r) for r in rows]
    c = np.array(center)
    out = centered_clip(ups, [float(i + 1) for i in range(len(ups))], c, tau, iterations)
    assert np.linalg.norm(out - c) <= tau * iterations * (1 + 1e-9) + 1e-9


def test_centered_clipping_hand_case_and_history() -> None:
    """One step from 0 with tau = 1: each update clipped to unit length, then averaged."""
    ups = [np.array([4.0, 0.0]), np.array([0.0, 0.5])]
    out = centered_clip(ups, [1.0, 1.0], np.zeros(2), tau=1.0, iterations=1)
    assert np.allclose(out, [0.5, 0.25])
    cc = CenteredClipping(tau=1.0, iterations=1)
    assert np.allclose(cc(ups, [1.0, 1.0], np.zeros(2)), out)
    # With the center at 0 and tau = "median", centered clipping is median norm clipping.
    assert np.allclose(
        centered_clip(ups, [1.0, 3.0], np.zeros(2), "median", 1),
        norm_clipping("median")(ups, [1.0, 3.0]),
    )
    with pytest.raises(ConfigError):
        CenteredClipping(tau=1.0, iterations=0)
    with pytest.raises(ConfigError):
        centered_clip(ups, [1.0, 1.0], np.zeros(3))


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
    st.data(),
)
def test_every_rule_is_permutation_invariant_and_pure(
    rows: list[list[float]], rnd: random.Random, data: st.DataObject
) -> None:
    """Reordering updates (with their weights) never changes a rule's result; no mutation."""
    ups = [np.array(r) for r in rows]
    ws = data.draw(st.lists(st.floats(0.5, 100.0), min_size=len(ups), max_size=len(ups)))
    copies = [u.copy() for u in ups]
    order = list(range(len(ups)))
    rnd.shuffle(order)
    for name, rule in _rules().items():
        try:
            first = rule(ups, ws)
        except ConfigError:
            with pytest.raises(ConfigError):
                rule([ups[i] for i in order], [ws[i] for i in order])
            continue
        second = rule([ups[i] for i in order], [ws[i] for i in order])
        assert first.shape == ups[0].shape, name
        assert np.allclose(first, second, rtol=1e-9, atol=1e-6), name
        assert all(np.array_equal(u, c) for u, c in zip(ups, copies, strict=True)), name


def test_make_aggregator_names_defaults_and_errors() -> None:
    """Every documented name builds; n_byzantine feeds the rule; bad input is a ConfigError."""
    assert set(NAMES) <= set(AGGREGATORS)
    assert DEFAULT in AGGREGATORS
    ups = [np.full(2, float(i)) for i in range(10)]
    for name in NAMES:
        out = make_aggregator(name, n_byzantine=3)(ups, [1.0] * 10)
        assert out.shape == (2,)
    tm3 = make_aggregator("trimmed_mean", n_byzantine=3)(ups, [1.0] * 10)
    assert np.allclose(tm3, np.mean(np.arange(3, 7)))
    # f = 0: the example-weighted mean of updates clipped at 5x the median norm (no trimming).
    ws = [float(i + 1) for i in range(10)]
    norms = np.linalg.norm(np.stack(ups), axis=1)
    radius = CLEAN_CLIP_MULTIPLE * float(np.median(norms))
    clipped = [u * min(1.0, radius / n) if n > 0 else u for u, n in zip(ups, norms, strict=True)]
    assert np.allclose(make_aggregator(DEFAULT)(ups, ws), fedavg(clipped, ws))
    # f = 3: median clipping, then 3 trimmed per side.
    assert np.allclose(make_aggregator(DEFAULT, 3)(ups, ws), clipped_trimmed_mean(trim=3)(ups, ws))
    with pytest.raises(ConfigError, match="unknown aggregator"):
        make_aggregator("krum++")
    with pytest.raises(ConfigError, match="bad parameters"):
        make_aggregator("median", beta=0.1)
    with pytest.raises(ConfigError):
        make_aggregator("multi_krum", n_byzantine=-1)


def test_default_rule_resists_a_scaled_attacker() -> None:
    """With f = 3 declared, clipping at the median norm + trimming keep x1000 updates from
    steering the result."""
    rng = np.random.default_rng(0)
    g = np.ones(20)
    honest = [g + 0.3 * rng.standard_normal(20) for _ in range(7)]
    bad = [1000.0 * h for h in honest[:3]]
    out = make_aggregator(DEFAULT, 3)([*honest, *bad], [1.0] * 10)
    assert float(out @ g / (np.linalg.norm(out) * np.linalg.norm(g))) > 0.9
    assert np.linalg.norm(out) < 2 * np.linalg.norm(g)


# ---------------------------------------------------------------- attacks


def test_attacks_do_what_their_docstrings_say() -> None:
    """Each behaviour's output matches its documented formula; inputs are never mutated."""
    rng = np.random.default_rng(0)
    h = np.array([3.0, -4.0, 0.0, 1.0])
    col = [h, np.array([1.0, 0.0, 2.0, 1.0]), np.array([2.0, -2.0, 1.0, 1.0])]
    keep = [c.copy() for c in col]
    att = functools.partial(attack_update, round_=3, rng=rng)
    assert np.array_equal(att("honest", h), h)
    assert att("honest", h) is not h
    assert np.array_equal(att("label_flip", h), h)
    assert np.array_equal(att("sign_flip", h), -h)
    assert np.array_equal(att("scaling", h), 10 * h)
    assert np.array_equal(att("scaling", h, scale=-2.0), -2 * h)
    mu, sd = np.mean(col, axis=0), np.std(col, axis=0)
    alie = att("alie", h, colluders=col, n_clients=10, n_byzantine=3)
    assert np.allclose(alie, mu - alie_z(10, 3) * sd)
    assert np.allclose(att("alie", h, colluders=col, z=2.0), mu - 2 * sd)
    assert np.allclose(att("alie", h, colluders=col), mu - sd)
    assert np.allclose(att("ipm", h, colluders=col), -0.5 * mu)
    assert np.allclose(att("ipm", h, colluders=col, epsilon=1.0), -mu)
    assert np.array_equal(att("free_rider", h), np.zeros(4))
    prev = np.arange(4.0)
    assert np.array_equal(att("free_rider", h, previous=prev), prev)
    assert all(np.array_equal(a, b) for a, b in zip(col, keep, strict=True))
    assert np.array_equal(h, [3.0, -4.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="unknown attack"):
        att("teleport", h)
    assert len(set(ATTACKS)) == len(ATTACKS)


def test_alie_z_matches_baruch() -> None:
    """s = floor(n/2 + 1) - f; z = Phi^-1((n - s)/n), hand-computed values."""
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-4)
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)  # s = 14, Phi^-1(0.72)
    with pytest.raises(ConfigError):
        alie_z(3, 4)


def test_gaussian_noise_has_the_documented_norm() -> None:
    """Pure noise, expected norm noise x |honest|, unrelated to the honest direction."""
    rng = np.random.default_rng(1)
    h = np.ones(10_000)
    out = attack_update("gaussian_noise", h, round_=1, rng=rng, noise=3.0)
    assert np.linalg.norm(out) == pytest.approx(3 * np.linalg.norm(h), rel=0.05)
    assert abs(float(out @ h) / (np.linalg.norm(out) * np.linalg.norm(h))) < 0.05


def test_backdoor_drift_grows_with_the_round_along_one_direction() -> None:
    """The bias is drift * round * |h| along a fixed unit vector shared by every call."""
    rng = np.random.default_rng(2)
    h = np.linspace(-1.0, 1.0, 30)
    d = drift_direction(30)
    assert np.linalg.norm(d) == pytest.approx(1.0)
    biases = [attack_update("backdoor_drift", h, round_=r, rng=rng) - h for r in (1, 2, 5)]
    for r, b in zip((1, 2, 5), biases, strict=True):
        assert np.allclose(b, 0.05 * r * np.linalg.norm(h) * d)
    assert np.allclose(attack_update("backdoor_drift", h, round_=0, rng=rng), h)


def test_flip_labels_maps_as_documented() -> None:
    """Reverse maps l -> K-1-l (the middle class of an odd K stays); random always changes."""
    rng = np.random.default_rng(3)
    y = np.array([0, 1, 2, 3, 4, 4, 0])
    assert np.array_equal(flip_labels(y, 5, rng), [4, 3, 2, 1, 0, 0, 4])
    r = flip_labels(y, 5, rng, mode="random")
    assert np.all(r != y) and r.min() >= 0 and r.max() < 5 and r.dtype == y.dtype
    assert np.array_equal(y, [0, 1, 2, 3, 4, 4, 0])
    with pytest.raises(ConfigError):
        flip_labels(y, 5, rng, mode="shuffle")
