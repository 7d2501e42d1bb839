"""Evaluation metrics in numpy (no scikit-learn inside actors)."""

from __future__ import annotations

import numpy as np

from medimesh.model import Model, predict_proba, topk_correct

__all__ = [
    "ECE_BINS",
    "clinical_scores",
    "evaluate",
    "expected_calibration_error",
    "macro_f1",
    "per_class_recall",
    "scores",
]

#: Equal-width bins on the top-1 confidence for :func:`expected_calibration_error`.
ECE_BINS = 15


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


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[float | None]:
    """Recall per class; None for a class absent from y_true."""
    out: list[float | None] = []
    for c in range(n_classes):
        n = int(np.sum(y_true == c))
        out.append(None if n == 0 else float(np.sum((y_pred == c) & (y_true == c)) / n))
    return out


def scores(proba: np.ndarray, y: np.ndarray) -> dict[str, object]:
    """The external-validation report: n, top-1, top-3, balanced accuracy, macro-F1, recalls."""
    k = proba.shape[1]
    pred = proba.argmax(axis=1)
    recalls = per_class_recall(y, pred, k)
    present = [r for r in recalls if r is not None]
    n = max(len(y), 1)
    return {
        "n": len(y),
        "top1": topk_correct(proba, y, 1) / n,
        "top3": topk_correct(proba, y, 3) / n,
        "balanced_accuracy": float(np.mean(present)) if present else 0.0,
        "macro_f1": macro_f1(y, pred, k),
        "per_class_recall": recalls,
    }


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


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: ``sum_b (n_b / n) |accuracy_b - mean confidence_b|`` over ``bins`` equal-width bins
    of the top-1 probability (Guo et al., ICML 2017; 15 bins, as there). 0 for no rows."""
    y = np.asarray(y)
    if len(y) == 0:
        return 0.0
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += float(sel.mean()) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return total


def clinical_scores(proba: np.ndarray, y: np.ndarray, other: int | None) -> dict[str, object]:
    """What a clinician asks of a differential, on one set of rows.

    ``top1``/``top3`` and ``ece`` over all rows; over the rows of a real disease (every class
    but ``other``, the "none of these" class): ``disease_top1``, ``disease_top3`` and
    ``disease_called_other``, the share the model sends home as "none of these".
    """
    y = np.asarray(y)
    n = max(len(y), 1)
    out: dict[str, object] = {
        "n": len(y),
        "top1": topk_correct(proba, y, 1) / n,
        "top3": topk_correct(proba, y, 3) / n,
        "ece": expected_calibration_error(proba, y),
    }
    sick = np.ones(len(y), dtype=bool) if other is None else y != other
    m = max(int(sick.sum()), 1)
    out["n_disease"] = int(sick.sum())
    out["disease_top1"] = topk_correct(proba[sick], y[sick], 1) / m
    out["disease_top3"] = topk_correct(proba[sick], y[sick], 3) / m
    out["disease_called_other"] = (
        None if other is None else float(np.mean(proba[sick].argmax(axis=1) == other))
        if sick.any() else 0.0
    )
    return out
