"""Softmax regression: gradients, training, calibration, hashing."""

from __future__ import annotations

import itertools

import numpy as np

from medimesh.model import (
    Model,
    TrainConfig,
    init_model,
    loss_and_grad,
    model_hash,
    predict_proba,
    smoothness,
    topk_correct,
    train_local,
)


def _data(n: int = 400, d: int = 6, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, k)) * 1.5
    p = np.exp(x @ w)
    p /= p.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return x, y


def test_gradient_matches_finite_differences() -> None:
    """Analytic gradient of CE + L2 + FedProx agrees with central differences."""
    x, y = _data(50, 4, 3)
    rng = np.random.default_rng(1)
    m = Model(rng.normal(size=(4, 3)), rng.normal(size=3))
    anchor = Model(rng.normal(size=(4, 3)), rng.normal(size=3))
    _, gw, gb = loss_and_grad(m, x, y, 0.1, anchor, 0.3)
    eps = 1e-6
    for i, j in [(0, 0), (2, 1), (3, 2)]:
        w_plus, w_minus = m.weights.copy(), m.weights.copy()
        w_plus[i, j] += eps
        w_minus[i, j] -= eps
        lp = loss_and_grad(Model(w_plus, m.bias), x, y, 0.1, anchor, 0.3)[0]
        lm = loss_and_grad(Model(w_minus, m.bias), x, y, 0.1, anchor, 0.3)[0]
        assert abs((lp - lm) / (2 * eps) - gw[i, j]) < 1e-5
    b_plus = m.bias.copy()
    b_plus[1] += eps
    b_minus = m.bias.copy()
    b_minus[1] -= eps
    numeric = (
        loss_and_grad(Model(m.weights, b_plus), x, y, 0.1, anchor, 0.3)[0]
        - loss_and_grad(Model(m.weights, b_minus), x, y, 0.1, anchor, 0.3)[0]
    ) / (2 * eps)
    assert abs(numeric - gb[1]) < 1e-5


def test_training_lowers_the_loss_and_never_mutates_the_start() -> None:
    """Local training improves the objective and returns a new model."""
    x, y = _data()
    start = init_model(6, 3)
    before = start.weights.copy()
    cfg = TrainConfig(epochs=50, l2=1e-3)
    trained = train_local(start, x, y, cfg)
    assert loss_and_grad(trained, x, y, 1e-3)[0] < loss_and_grad(start, x, y, 1e-3)[0] - 0.2
    assert np.array_equal(start.weights, before)


def test_probabilities_are_calibrated_on_well_specified_data() -> None:
    """On data drawn from a softmax model, predicted confidence matches accuracy (ECE < 0.05)."""
    x, y = _data(4000, 6, 3, seed=3)
    model = train_local(init_model(6, 3), x[:3000], y[:3000], TrainConfig(epochs=300, l2=1e-4))
    proba = predict_proba(model, x[3000:])
    conf, pred = proba.max(axis=1), proba.argmax(axis=1)
    correct = pred == y[3000:]
    bins = np.linspace(0, 1, 11)
    ece = 0.0
    for lo, hi in itertools.pairwise(bins):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert ece < 0.05


def test_fedprox_keeps_the_local_model_near_the_anchor() -> None:
    """A large proximal term shrinks how far local training moves from the global model."""
    x, y = _data()
    start = init_model(6, 3)
    free = train_local(start, x, y, TrainConfig(epochs=20))
    prox = train_local(start, x, y, TrainConfig(epochs=20, prox_mu=10.0))
    assert np.linalg.norm(prox.weights) < 0.5 * np.linalg.norm(free.weights)


def test_float32_training_matches_float64() -> None:
    """Hospitals train in float32 for speed; the result matches float64 closely."""
    x, y = _data()
    cfg = TrainConfig(epochs=20)
    a = train_local(init_model(6, 3), x, y, cfg)
    b = train_local(init_model(6, 3), x.astype(np.float32), y, cfg)
    assert np.allclose(a.weights, b.weights, atol=1e-4)


def test_smoothness_bounds_the_curvature() -> None:
    """The Böhning bound is at least the largest Hessian eigenvalue direction we probe."""
    x, _ = _data(200, 5, 3)
    big_l = smoothness(x)
    xb = np.hstack([x, np.ones((200, 1))])
    assert big_l >= 0.5 * np.linalg.eigvalsh(xb.T @ xb / 200).max()


def test_model_hash_is_stable_and_sensitive() -> None:
    """Same parameters give the same hash; any change gives another."""
    m = init_model(4, 3, np.array([0.2, 0.3, 0.5]))
    assert model_hash(m) == model_hash(Model(m.weights.copy(), m.bias.copy()))
    w = m.weights.copy()
    w[1, 1] = 1e-3
    assert model_hash(Model(w, m.bias)) != model_hash(m)


def test_topk_counts() -> None:
    """Top-k counts whether the true class is among the k most probable."""
    proba = np.array([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    y = np.array([2, 2, 0])
    assert topk_correct(proba, y, 1) == 0
    assert topk_correct(proba, y, 2) == 2
    assert topk_correct(proba, y, 3) == 3
