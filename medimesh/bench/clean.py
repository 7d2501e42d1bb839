"""``medimesh bench clean``: honest consortia over many seeds — is anyone excluded, and how
close is federated to pooled?

Issue 13's clean-run checks, each a suite run once per seed with the defaults a user gets
(declared f = 0 unless ``tolerate`` says otherwise):

- ``heart``: ``bench accuracy --dataset heart`` (FLamby's fixed split; seeds do not change it,
  so it runs once and says so);
- ``heart-csv``: the four centres written by ``medimesh data heart`` and trained through the
  ``medimesh train`` path (CSV sites, default recipe; the seed draws each site's test split);
- ``rare-8``, ``rare-10``: the rare cohort with 8 and 10 hospitals;
- ``sparse``: the sparse HPO consortium, 6 hospitals, 30 rounds.

Per suite: honest updates rejected (count, rate), hospitals excluded (who, which seed),
flags raised on kept updates, the headline metric (mean, min over seeds) and, where a pooled
model is trained, federated / pooled and the dominated-class recall ratio.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUITES", "run_clean"]

SUITES = ("heart", "heart-csv", "rare-8", "rare-10", "sparse")


def _config(suite: str, seed: int, tolerate: int, csv_dir: Path | None) -> Any:
    from medimesh.actors.runtime import RunConfig
    from medimesh.recipes import recipe
    from medimesh.spec import load_spec

    if suite == "heart-csv":
        assert csv_dir is not None
        from medimesh.data.heart import CENTERS

        spec = load_spec(csv_dir / "spec.json").to_dict()
        sites = tuple((c, str(csv_dir / f"{c}.csv")) for c in CENTERS)
        return RunConfig(dataset="csv", spec=spec, csv_sites=sites, seed=seed, rounds=20,
                         tolerate=tolerate, train=recipe("csv").train)
    dataset, hospitals, rounds, alpha = {
        "heart": ("heart", 4, 20, 0.5),
        "rare-8": ("rare", 8, 20, 0.5),
        "rare-10": ("rare", 10, 20, 0.5),
        "sparse": ("sparse", 6, 30, 0.3),
    }[suite]
    plan = recipe(dataset)
    return RunConfig(dataset=dataset, hospitals=hospitals, rounds=rounds, seed=seed,
                     alpha=alpha, train=plan.train, server_momentum=plan.server_momentum,
                     tolerate=tolerate)


def _csv_run(cfg: Any) -> dict[str, Any]:
    """The `medimesh train` path: the run's own round metrics (union of test splits)."""
    from medimesh.actors.runtime import Consortium
    from medimesh.bench.accuracy import verdict_summary

    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
    finally:
        fed.shutdown()
    return {"headline": {"metric": "top1_union (hospitals' own test splits)",
                         "federated": history[-1]["top1"]},
            **verdict_summary(history)}


def run_clean(
    suites: Sequence[str], seeds: int, tolerate: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    from medimesh.bench.accuracy import run_accuracy
    from medimesh.data.heart import export_csv

    t0 = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "clean", "declared_f": tolerate, "seeds": seeds,
                           "suites": {}}
    with tempfile.TemporaryDirectory(prefix="medimesh-heart-csv-") as tmp:
        csv_dir: Path | None = None
        if "heart-csv" in suites:
            csv_dir = Path(tmp)
            export_csv(csv_dir)
        for suite in suites:
            runs = []
            for seed in range(1 if suite == "heart" else seeds):
                t1 = time.perf_counter()
                cfg = _config(suite, seed, tolerate, csv_dir)
                if suite == "heart-csv":
                    r = _csv_run(cfg)
                else:
                    r = run_accuracy(cfg, isolated_baselines=False)
                row = {
                    "seed": seed,
                    "headline": r["headline"],
                    "federated_over_pooled": r["headline"].get("ratio"),
                    "dominated_recall_ratio": r.get("dominated_recall_federated_over_pooled"),
                    **r["verdicts"],
                    "wall_s": round(time.perf_counter() - t1, 1),
                }
                runs.append(row)
                progress(
                    f"{suite:>9} seed {seed}  {r['headline']['metric'].split()[0]} "
                    f"{r['headline']['federated']:.3f}"
                    + (f" (x{row['federated_over_pooled']:.3f} pooled)"
                       if row["federated_over_pooled"] else "")
                    + f"  rejected {row['rejected']}/{row['updates']}"
                    f"  excluded {row['hospitals_excluded'] or '-'}  {row['wall_s']} s"
                )
            out["suites"][suite] = _summary(suite, runs, seeds)
    out["honest_hospitals_excluded"] = sum(
        s["hospitals_excluded_runs"] for s in out["suites"].values()
    )
    out["worst_rejected_rate"] = max(
        (s["rejected_rate_max"] for s in out["suites"].values()), default=0.0
    )
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _stats(values: list[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}


def _summary(suite: str, runs: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    updates = sum(r["updates"] for r in runs)
    rejected = sum(r["rejected"] for r in runs)
    return {
        "metric": runs[0]["headline"]["metric"],
        "runs": len(runs),
        "note": (f"deterministic (FLamby's fixed split): one run stands for {seeds} seeds"
                 if suite == "heart" else ""),
        "federated": _stats([r["headline"]["federated"] for r in runs]),
        "pooled": _stats([r["headline"].get("pooled") for r in runs]),
        "federated_over_pooled": _stats([r["federated_over_pooled"] for r in runs]),
        "dominated_recall_ratio": _stats([r["dominated_recall_ratio"] for r in runs]),
        "updates": updates,
        "rejected": rejected,
        "rejected_rate": rejected / updates if updates else 0.0,
        "rejected_rate_max": max((r["rejected_rate"] for r in runs), default=0.0),
        "hospitals_excluded_runs": sum(len(r["hospitals_excluded"]) for r in runs),
        "excluded": [{"seed": r["seed"], "hospitals": r["hospitals_excluded"]}
                     for r in runs if r["hospitals_excluded"]],
        "flagged_runs": sum(1 for r in runs if r["hospitals_flagged"]),
        "per_seed": [
            {"seed": r["seed"], "federated": r["headline"]["federated"],
             **{k: r[k] for k in _PER_SEED}}
            for r in runs
        ],
    }


_PER_SEED = ("federated_over_pooled", "dominated_recall_ratio", "rejected", "updates",
             "hospitals_excluded", "hospitals_flagged", "wall_s")
