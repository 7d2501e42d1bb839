"""Evaluation metrics in numpy (no scikit-learn inside actors)."""

from __future__ import annotations

import numpy as np

from medimesh.model import Model, predict_proba, topk_correct

__all__ = ["evaluate", "macro_f1"]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean F1 over the classes present in y_true or y_pred."""
    f1s = []
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def evaluate(model: Model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Top-1, top-3 and macro-F1 of a model on (standardized) rows."""
    proba = predict_proba(model, x)
    n = max(len(y), 1)
    return {
        "n": len(y),
        "top1": topk_correct(proba, y, 1) / n,
        "top3": topk_correct(proba, y, 3) / n,
        "macro_f1": macro_f1(y, proba.argmax(axis=1), model.n_classes),
    }
