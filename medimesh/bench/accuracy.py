"""``medimesh bench accuracy``: federated vs pooled vs isolated on the same splits.

Besides overall top-1/top-3/macro-F1 it reports recall on *single-site-dominated* classes
(at least :data:`DOMINANCE` of a class's training rows at one hospital): overall accuracy can
look fine while federation fails exactly the diseases only one hospital sees (issue 13).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medimesh.bench.baselines import Prepared, fit_centralized, prepare, standardizer_for
from medimesh.evidence import GENETIC_TESTING_COLUMN, MEASURED_PREFIX, symptoms_only
from medimesh.features import Standardizer, log_transform
from medimesh.metrics import ECE_BINS, clinical_scores, evaluate
from medimesh.model import Model, predict_proba
from medimesh.sites import DatasetInfo, LocalData, dataset_info, load_site

__all__ = [
    "DOMINANCE", "clinical_report", "dominated_class_recall", "dominated_classes", "run_accuracy",
    "verdict_summary",
]

#: The class that means "none of the panel's diseases" (rare cohort, CSV specs alike).
OTHER_CLASS_PREFIX = "Other"

BASELINE_STEPS = 600
#: A class is single-site-dominated when this share of its training rows sits at one site.
DOMINANCE = 0.8


def dominated_classes(
    train_labels: Sequence[np.ndarray], n_classes: int, threshold: float = DOMINANCE
) -> dict[int, tuple[int, float]]:
    """Class -> (dominant site index, its share of the class's training rows), for every
    class with at least ``threshold`` of its training rows at one site."""
    counts = np.stack(
        [np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes) for y in train_labels],
        axis=1,
    )
    out: dict[int, tuple[int, float]] = {}
    for c in range(n_classes):
        total = int(counts[c].sum())
        if total == 0:
            continue
        site = int(counts[c].argmax())
        share = float(counts[c, site] / total)
        if share >= threshold:
            out[c] = (site, share)
    return out


def _recall(y_true: np.ndarray, y_pred: np.ndarray, c: int) -> float | None:
    n = int(np.sum(y_true == c))
    return None if n == 0 else float(np.sum((y_true == c) & (y_pred == c)) / n)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def dominated_class_recall(
    train_labels: Sequence[np.ndarray],
    site_names: Sequence[str],
    class_names: Sequence[str],
    y_test: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    isolated_predictions: Sequence[np.ndarray] = (),
    threshold: float = DOMINANCE,
) -> dict[str, Any]:
    """Per-class and mean recall on single-site-dominated classes (pure; numpy only).

    ``train_labels`` are each site's training labels (in site order), ``predictions`` maps a
    model ("federated", "pooled", ...) to its predicted classes on ``y_test`` (the union of
    test splits), ``isolated_predictions`` holds each site's own model's predictions in site
    order: their mean is "isolated_mean", the dominant site's own one "isolated_dominant_site".
    Means skip classes without test rows; the ratio is mean federated / mean pooled recall.
    """
    dominated = dominated_classes(train_labels, len(class_names), threshold)
    y_test = np.asarray(y_test)
    models = list(predictions)
    if isolated_predictions:
        models += ["isolated_mean", "isolated_dominant_site"]
    rows: list[dict[str, Any]] = []
    for c, (site, share) in sorted(dominated.items()):
        recall: dict[str, float | None] = {
            m: _recall(y_test, np.asarray(p), c) for m, p in predictions.items()
        }
        if isolated_predictions:
            own = [_recall(y_test, np.asarray(p), c) for p in isolated_predictions]
            recall["isolated_mean"] = _mean(own)
            recall["isolated_dominant_site"] = own[site]
        rows.append(
            {
                "class": class_names[c],
                "index": c,
                "dominant_site": site_names[site],
                "share": round(share, 4),
                "n_train": int(sum(int(np.sum(np.asarray(y) == c)) for y in train_labels)),
                "n_test": int(np.sum(y_test == c)),
                "recall": recall,
            }
        )
    means = {m: _mean([r["recall"][m] for r in rows]) for m in models}
    fed, pooled = means.get("federated"), means.get("pooled")
    return {
        "definition": f">= {threshold:.0%} of the class's training rows at one site",
        "threshold": threshold,
        "n_classes": len(rows),
        "n_classes_with_test_rows": sum(1 for r in rows if r["n_test"] > 0),
        "mean_recall": means,
        "federated_over_pooled": (
            None if fed is None or not pooled else fed / pooled
        ),
        "classes": rows,
    }


def run_accuracy(cfg: Any, progress: Any = None, isolated_baselines: bool = True) -> dict[str, Any]:
    """Run the real federated protocol, then score it beside pooled and isolated models.

    ``isolated_baselines=False`` skips the per-site models (most of the time on the sparse
    consortium); their fields are then left out, never filled with made-up numbers."""
    from medimesh.actors.runtime import Consortium

    t0 = time.perf_counter()
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run(progress)
        final = fed.final_model()
    finally:
        fed.shutdown()
    fed_model = Model(np.asarray(final["weights"]), np.asarray(final["bias"]))
    t_fed = time.perf_counter() - t0

    info = dataset_info(fed.descriptors[0].kind, fed.descriptors[0].params)
    sites = [load_site(d) for d in fed.descriptors]
    k = len(info.class_names)
    std, prior = standardizer_for(sites, info)
    prepared = [_precision(prepare(s, info, std), cfg.dataset) for s in sites]
    x_test = np.vstack([p.x_test for p in prepared])
    y_test = np.concatenate([p.y_test for p in prepared])

    pooled = fit_centralized(
        np.vstack([p.x_train for p in prepared]),
        np.concatenate([p.y_train for p in prepared]),
        k,
        prior,
        cfg.train,
        BASELINE_STEPS,
    )
    isolated: list[dict[str, Any]] = []
    isolated_pred: list[np.ndarray] = []
    isolated_clinical: list[dict[str, Any]] = []
    for site in sites if isolated_baselines else []:
        own_std, own_prior = standardizer_for([site], info)
        own = _precision(prepare(site, info, own_std), cfg.dataset)
        model = fit_centralized(own.x_train, own.y_train, k, own_prior, cfg.train, BASELINE_STEPS)
        union = [_precision(prepare(s, info, own_std), cfg.dataset) for s in sites]
        xs = np.vstack([u.x_test for u in union])
        isolated_pred.append(predict_proba(model, xs).argmax(axis=1))
        isolated_clinical.append(clinical_report(model, sites, info, own_std))
        scores = evaluate(model, xs, y_test)
        own_scores = evaluate(model, own.x_test, own.y_test)
        isolated.append(
            {
                "site": site.name,
                "n_train": len(site.y_train),
                "classes_seen": len(np.unique(site.y_train)),
                **scores,
                "own_test_top1": own_scores["top1"],
                "per_center": [
                    evaluate(model, u.x_test, u.y_test)["top1"] for u in union
                ],
            }
        )

    def per_center(model: Model) -> list[float]:
        return [evaluate(model, p.x_test, p.y_test)["top1"] for p in prepared]

    fed_scores = evaluate(fed_model, x_test, y_test)
    pooled_scores = evaluate(pooled, x_test, y_test)
    iso_mean = {
        m: float(np.mean([r[m] for r in isolated])) if isolated else float("nan")
        for m in ("top1", "top3", "macro_f1")
    }
    out: dict[str, Any] = {
        "benchmark": "accuracy",
        "dataset": cfg.dataset,
        "hospitals": len(sites),
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "alpha": cfg.alpha if cfg.dataset in ("rare", "sparse") else None,
        "n_train": int(sum(len(s.y_train) for s in sites)),
        "n_test": len(y_test),
        "evaluated_on": "union of the hospitals' test splits",
        "federated": {**fed_scores, "per_center_top1": per_center(fed_model)},
        "pooled": {**pooled_scores, "per_center_top1": per_center(pooled)},
        "isolated_mean": iso_mean,
        "isolated": isolated,
        "federated_over_pooled_top1": fed_scores["top1"] / max(pooled_scores["top1"], 1e-12),
        "federated_minus_isolated_top1": fed_scores["top1"] - iso_mean["top1"],
        "federated_last_round_reported_top1": history[-1]["top1"],
        "model_hash": final["model_hash"],
        "train_config": {
            "epochs": cfg.train.epochs,
            "lr": cfg.train.lr,
            "l2": cfg.train.l2,
            "prox_mu": cfg.train.prox_mu,
        },
        "federated_wall_s": round(t_fed, 3),
        "centers": [s.name for s in sites],
        **verdict_summary(history),
    }
    for who in ("federated", "pooled"):  # the same lists, named
        out[who]["per_center_top1_by_name"] = dict(
            zip(out["centers"], out[who]["per_center_top1"], strict=True)
        )
    out["mean_of_centers_top1"] = {
        "federated": float(np.mean(out["federated"]["per_center_top1"])),
        "pooled": float(np.mean(out["pooled"]["per_center_top1"])),
    }
    if cfg.dataset == "heart":
        # FLamby's metric: mean over centers of per-center test accuracy.
        out["flamby_metric"] = {
            "federated": float(np.mean(out["federated"]["per_center_top1"])),
            "pooled": float(np.mean(out["pooled"]["per_center_top1"])),
            "isolated_own_center": float(np.mean([r["own_test_top1"] for r in isolated]))
            if isolated else float("nan"),
            "isolated_all_centers": float(np.mean([np.mean(r["per_center"]) for r in isolated]))
            if isolated else float("nan"),
        }
    out["clinical"] = {
        "definition": _CLINICAL_DEFINITION,
        "federated": clinical_report(fed_model, sites, info, std),
        "pooled": clinical_report(pooled, sites, info, std),
        "isolated_mean": _mean_report(isolated_clinical),
    }
    out["headline"] = _headline(cfg.dataset, out)
    out["dominated_classes"] = dominated_class_recall(
        [s.y_train for s in sites],
        [s.name for s in sites],
        info.class_names,
        y_test,
        {
            "federated": predict_proba(fed_model, x_test).argmax(axis=1),
            "pooled": predict_proba(pooled, x_test).argmax(axis=1),
        },
        isolated_pred,
    )
    out["dominated_recall_federated_over_pooled"] = out["dominated_classes"][
        "federated_over_pooled"
    ]
    return out


def verdict_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round: accepted and rejected counts with reasons, and who was excluded or flagged
    (score and threshold); over the run: every hospital excluded at least once."""
    rounds = [
        {k: m.get(k) for k in ("round", "accepted", "rejected", "reasons", "excluded", "flagged")}
        for m in history
    ]
    updates = sum(int(m["accepted"]) + int(m["rejected"]) for m in history)
    rejected = sum(int(m["rejected"]) for m in history)
    return {
        "verdicts": {
            "updates": updates,
            "rejected": rejected,
            "rejected_rate": rejected / updates if updates else 0.0,
            "hospitals_excluded": sorted(
                {row["hospital"] for m in history for row in m.get("excluded") or []}
            ),
            "hospitals_flagged": sorted(
                {row["hospital"] for m in history for row in m.get("flagged") or []}
            ),
        },
        "per_round": rounds,
    }


def _precision(p: Prepared, dataset: str) -> Prepared:
    """Sparse rows train in float32 like the hospitals do: 2,000 x 77 weights make float64
    baselines several times slower, for no difference at this model's precision."""
    if dataset != "sparse":
        return p
    f32 = np.float32
    return Prepared(p.name, p.x_train.astype(f32), p.y_train, p.x_test.astype(f32), p.y_test)


_CLINICAL_DEFINITION = (
    "On the union of the test splits. full: the rows as recorded; symptoms_only: the same "
    "patients with labs and genetics removed (every marker not measured, not sequenced), "
    "symptoms, age and sex kept. disease_*: rows whose true class is a disease (not 'Other'); "
    "disease_called_other: share of those ranked 'Other' first. ece: expected calibration "
    f"error over all rows, {ECE_BINS} equal-width bins of the top-1 probability."
)


def _other_index(info: DatasetInfo) -> int | None:
    hits = [i for i, c in enumerate(info.class_names) if c.startswith(OTHER_CLASS_PREFIX)]
    return hits[0] if len(hits) == 1 else None


def clinical_report(
    model: Model, sites: Sequence[LocalData], info: DatasetInfo, std: Standardizer
) -> dict[str, Any]:
    """:func:`medimesh.metrics.clinical_scores` on the union of the sites' test rows, as
    recorded (``full``) and, where the schema tells labs and genetics apart (``measured:``
    and ``genetic_testing_done`` columns), with them removed (``symptoms_only``)."""
    raw = np.vstack([s.x_test for s in sites])
    y = np.concatenate([s.y_test for s in sites])
    other = _other_index(info)

    def proba(x: np.ndarray) -> np.ndarray:
        return predict_proba(model, std.apply(log_transform(x, info.log_mask)))

    out: dict[str, Any] = {"full": clinical_scores(proba(raw), y, other)}
    names = info.feature_names
    if any(n.startswith(MEASURED_PREFIX) for n in names) and GENETIC_TESTING_COLUMN in names:
        out["symptoms_only"] = clinical_scores(proba(symptoms_only(raw, names)), y, other)
    return out


def _mean_report(reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean of each number over the isolated models (None without isolated baselines)."""
    if not reports:
        return None
    out: dict[str, Any] = {}
    for view in reports[0]:
        out[view] = {}
        for key, value in reports[0][view].items():
            vals = [r[view][key] for r in reports if r[view][key] is not None]
            out[view][key] = float(np.mean(vals)) if vals and value is not None else None
    return out


def _headline(dataset: str, out: dict[str, Any]) -> dict[str, Any]:
    """The one number to quote per dataset, labelled: heart uses FLamby's metric."""
    if dataset == "heart":
        fed, pooled = out["flamby_metric"]["federated"], out["flamby_metric"]["pooled"]
        metric = "mean_of_centers_top1 (FLamby)"
        iso = out["flamby_metric"]["isolated_own_center"]
    else:
        fed, pooled = out["federated"]["top1"], out["pooled"]["top1"]
        metric = "top1_union"
        iso = out["isolated_mean"]["top1"]
    head: dict[str, Any] = {
        "metric": metric,
        "federated": fed,
        "pooled": pooled,
        "isolated_mean": iso,
        "ratio": fed / max(pooled, 1e-12),
    }
    clinical = out.get("clinical")
    if clinical is None:
        return head
    keys = ("disease_top1", "disease_top3", "disease_called_other", "ece")
    for who in ("federated", "pooled", "isolated_mean"):
        report = clinical.get(who)
        if report is None:
            continue
        for view, tag in (("full", "full"), ("symptoms_only", "symptom_only")):
            if view in report:
                for key in keys:
                    head[f"{who}_{tag}_{key}"] = report[view][key]
    fed_full = clinical["federated"]["full"]["top1"]
    pooled_full = clinical["pooled"]["full"]["top1"]
    head["federated_over_pooled_full_top1"] = fed_full / max(pooled_full, 1e-12)
    head["ece_bins"] = f"{ECE_BINS} equal-width bins of the top-1 probability"
    return head
