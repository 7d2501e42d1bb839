"""``medimesh bench rounds``: startup time and per-round wall time of the full protocol."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["run_rounds"]


def run_rounds(cfg: Any, progress: Any = None) -> dict[str, Any]:
    """Each round: train, seal, route, validate, aggregate, publish, evaluate, audit."""
    from medimesh.actors.runtime import Consortium

    fed = Consortium(cfg)
    try:
        timings = fed.start()
        history = fed.run(progress)
        stats = fed.router_stats()
        audit = fed.verify_audit()
    finally:
        fed.shutdown()
    ms = np.array([m["duration_s"] for m in history]) * 1000.0
    n_updates = stats["messages_by_type"].get("update", 0)
    return {
        "benchmark": "rounds",
        "dataset": cfg.dataset,
        "hospitals": cfg.n_sites,
        "rounds": cfg.rounds,
        "ray_dashboard": cfg.ray_dashboard,
        "startup_s": {k: round(v, 3) for k, v in timings.items()},
        "round_ms": {
            "p50": round(float(np.percentile(ms, 50)), 2),
            "p90": round(float(np.percentile(ms, 90)), 2),
            "max": round(float(ms.max()), 2),
            "mean": round(float(ms.mean()), 2),
        },
        "round_ms_all": [round(float(x), 2) for x in ms],
        "bytes_per_update": (
            round(stats["bytes_by_type"].get("update", 0) / n_updates) if n_updates else 0
        ),
        "bytes_per_round": round(float(np.mean([m["bytes_routed"] for m in history]))),
        "messages_by_type": stats["messages_by_type"],
        "accepted_per_round": [m["accepted"] for m in history],
        "final_top1": history[-1]["top1"],
        "audit": {"entries": audit["entries"], "verifies": audit["ok"]},
    }
