"""``medimesh bench accuracy``: federated vs pooled vs isolated on the same splits."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from medimesh.bench.baselines import fit_centralized, prepare, standardizer_for
from medimesh.metrics import evaluate
from medimesh.model import Model
from medimesh.sites import dataset_info, load_site

__all__ = ["run_accuracy"]

BASELINE_STEPS = 600


def run_accuracy(cfg: Any, progress: Any = None) -> dict[str, Any]:
    """Run the real federated protocol, then score it beside pooled and isolated models."""
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
    prepared = [prepare(s, info, std) for s in sites]
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
    for site in sites:
        own_std, own_prior = standardizer_for([site], info)
        own = prepare(site, info, own_std)
        model = fit_centralized(own.x_train, own.y_train, k, own_prior, cfg.train, BASELINE_STEPS)
        union = [prepare(s, info, own_std) for s in sites]
        xs = np.vstack([u.x_test for u in union])
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
    iso_mean = {m: float(np.mean([r[m] for r in isolated])) for m in ("top1", "top3", "macro_f1")}
    out: dict[str, Any] = {
        "benchmark": "accuracy",
        "dataset": cfg.dataset,
        "hospitals": len(sites),
        "rounds": cfg.rounds,
        "seed": cfg.seed,
        "alpha": cfg.alpha if cfg.dataset == "rare" else None,
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
    }
    out["mean_of_centers_top1"] = {
        "federated": float(np.mean(out["federated"]["per_center_top1"])),
        "pooled": float(np.mean(out["pooled"]["per_center_top1"])),
    }
    if cfg.dataset == "heart":
        # FLamby's metric: mean over centers of per-center test accuracy.
        out["flamby_metric"] = {
            "federated": float(np.mean(out["federated"]["per_center_top1"])),
            "pooled": float(np.mean(out["pooled"]["per_center_top1"])),
            "isolated_own_center": float(np.mean([r["own_test_top1"] for r in isolated])),
            "isolated_all_centers": float(
                np.mean([np.mean(r["per_center"]) for r in isolated])
            ),
        }
    return out
