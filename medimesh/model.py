"""Multinomial logistic regression in numpy: the diagnosis model every hospital trains.

A model is a frozen pair (weights ``d x k``, bias ``k``). Training returns a new model; nothing
here mutates its inputs. Local training minimises mean cross-entropy + L2, plus an optional
FedProx term ``mu/2 ||w - w_global||^2`` that keeps non-IID sites near the shared model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from medimesh.errors import ConfigError

__all__ = [
    "Model",
    "TrainConfig",
    "cross_entropy",
    "init_model",
    "loss_and_grad",
    "model_hash",
    "predict_proba",
    "smoothness",
    "topk_correct",
    "train_local",
]


@dataclass(frozen=True, slots=True)
class Model:
    """Softmax-regression parameters; ``weights`` is (features, classes)."""

    weights: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        if self.weights.ndim != 2 or self.bias.shape != (self.weights.shape[1],):
            raise ConfigError(
                f"model shapes disagree: weights {self.weights.shape}, bias {self.bias.shape}"
            )

    @property
    def n_features(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.weights.shape[1])

    def astype32(self) -> Model:
        return Model(self.weights.astype(np.float32), self.bias.astype(np.float32))


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Local training recipe, sent by the coordinator with every round."""

    epochs: int = 5
    lr: float = 1.0
    l2: float = 1e-3
    prox_mu: float = 0.0
    clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0 < self.lr <= 2 or self.l2 < 0 or self.prox_mu < 0:
            raise ConfigError(f"invalid training config: {self}")
        if self.clip_norm < 0:
            raise ConfigError("clip_norm must be >= 0 (0 disables clipping)")


def init_model(n_features: int, n_classes: int, prior: np.ndarray | None = None) -> Model:
    """Zero weights; bias = log class prior so round 0 predicts the base rates."""
    if n_features < 1 or n_classes < 2:
        raise ConfigError("a model needs at least one feature and two classes")
    bias = np.zeros(n_classes)
    if prior is not None:
        p = np.clip(np.asarray(prior, dtype=np.float64), 1e-6, None)
        bias = np.log(p / p.sum())
        bias -= bias.mean()
    return Model(np.zeros((n_features, n_classes)), bias)


def model_hash(model: Model) -> str:
    """SHA-256 over the float32 little-endian bytes and shapes: the model's public name."""
    h = hashlib.sha256(b"medimesh/model/v1\0")
    w = np.ascontiguousarray(model.weights, dtype="<f4")
    b = np.ascontiguousarray(model.bias, dtype="<f4")
    h.update(np.array(w.shape + b.shape, dtype="<i8").tobytes())
    h.update(w.tobytes())
    h.update(b.tobytes())
    return h.hexdigest()


def _logits(model: Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(x @ model.weights + model.bias)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def predict_proba(model: Model, x: np.ndarray) -> np.ndarray:
    """Class probabilities, rows summing to one."""
    return _softmax(_logits(model, x))


def cross_entropy(proba: np.ndarray, y: np.ndarray) -> float:
    """Summed negative log-likelihood (callers divide by n where they need a mean)."""
    p = proba[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, None)).sum())


def topk_correct(proba: np.ndarray, y: np.ndarray, k: int) -> int:
    """How many rows have the true class among the k most probable."""
    if len(y) == 0:
        return 0
    k = min(k, proba.shape[1])
    top = np.argpartition(-proba, k - 1, axis=1)[:, :k]
    return int((top == y[:, None]).any(axis=1).sum())


def _gradient(
    model: Model,
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    anchor: Model | None,
    prox_mu: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, grad weights, grad bias) of the regularized objective."""
    n = max(len(y), 1)
    proba = predict_proba(model, x)
    resid = proba.copy()
    resid[np.arange(len(y)), y] -= 1.0
    gw = x.T @ resid / n + l2 * model.weights
    gb = resid.sum(axis=0) / n
    if anchor is not None and prox_mu > 0:
        gw = gw + prox_mu * (model.weights - anchor.weights)
        gb = gb + prox_mu * (model.bias - anchor.bias)
    return proba, gw, gb


def loss_and_grad(
    model: Model,
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    anchor: Model | None = None,
    prox_mu: float = 0.0,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy + L2 (+ FedProx) and its gradient with respect to (weights, bias)."""
    proba, gw, gb = _gradient(model, x, y, l2, anchor, prox_mu)
    loss = cross_entropy(proba, y) / max(len(y), 1)
    loss += 0.5 * l2 * float((model.weights.astype(np.float64) ** 2).sum())
    if anchor is not None and prox_mu > 0:
        dw = (model.weights - anchor.weights).astype(np.float64)
        db = (model.bias - anchor.bias).astype(np.float64)
        loss += 0.5 * prox_mu * float((dw**2).sum() + (db**2).sum())
    return loss, gw, gb


def smoothness(x: np.ndarray, iterations: int = 30) -> float:
    """Curvature bound of mean softmax cross-entropy: 0.5 * lambda_max([x 1]^T [x 1]) / n.

    (Böhning's bound.) Stepping with 1/L makes local training stable on any site's feature
    scale, so the coordinator sends a relative step size instead of guessing an absolute one.
    """
    n = max(x.shape[0], 1)
    xb = np.hstack([x, np.ones((x.shape[0], 1))])
    v = np.ones(xb.shape[1]) / np.sqrt(xb.shape[1])
    lam = 0.0
    for _ in range(iterations):
        w = xb.T @ (xb @ v)
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            break
        v = w / lam
    return float(0.5 * lam / n * 1.05 + 1e-12)


def train_local(
    model: Model, x: np.ndarray, y: np.ndarray, config: TrainConfig, curvature: float | None = None
) -> Model:
    """Nesterov-accelerated full-batch gradient descent, starting from the global model.

    ``config.lr`` is relative: the step is ``lr / L`` with L the objective's smoothness bound,
    so it is stable whatever a site's data look like. Full batches keep a site's work
    deterministic and cheap (hundreds of rows).
    """
    if len(y) == 0:
        return model
    big_l = (smoothness(x) if curvature is None else curvature) + config.l2 + config.prox_mu
    step = x.dtype.type(config.lr / big_l)
    # Train in the data's precision: float32 rows halve the cost of every matmul.
    w = model.weights.astype(x.dtype)
    b = model.bias.astype(x.dtype)
    w_prev, b_prev = w, b
    anchor = model if config.prox_mu > 0 else None
    for t in range(1, config.epochs + 1):
        beta = (t - 1) / (t + 2)
        look = Model(w + beta * (w - w_prev), b + beta * (b - b_prev))
        _, gw, gb = _gradient(look, x, y, config.l2, anchor, config.prox_mu)
        w_prev, b_prev = w, b
        w = look.weights - step * gw
        b = look.bias - step * gb
    return Model(w.astype(np.float64), b.astype(np.float64))
