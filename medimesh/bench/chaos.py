"""``medimesh bench chaos``: training through message loss and hospital crashes.

Two runs of the same federation on real actors: a clean one, and one where the router drops
``drop`` of all envelopes (after the setup round) and a hospital actor is killed every
``kill_every`` rounds (while the next round is in flight; Ray restarts it, the coordinator
re-sends it the setup result and it rejoins). Both final models are scored on every site's
test rows by the benchmark harness (the same evaluation for both, independent of which eval
reports the router dropped). The audit trail of the chaos run must verify with no gap.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

import numpy as np

from medimesh.bench.baselines import prepare, standardizer_for
from medimesh.metrics import evaluate
from medimesh.model import Model
from medimesh.sites import dataset_info, load_site

__all__ = ["run_chaos"]


def _score(fed: Any) -> float:
    """Top-1 of the federation's final model over the union of the sites' test rows."""
    final = fed.final_model()
    model = Model(np.asarray(final["weights"]), np.asarray(final["bias"]))
    info = dataset_info(fed.descriptors[0].kind, fed.descriptors[0].params)
    sites = [load_site(d) for d in fed.descriptors]
    std, _ = standardizer_for(sites, info)
    prepared = [prepare(s, info, std) for s in sites]
    x = np.vstack([p.x_test for p in prepared])
    y = np.concatenate([p.y_test for p in prepared])
    return float(evaluate(model, x, y)["top1"])


def _one(cfg: Any, drop: float, kill_every: int, progress: Any) -> dict[str, Any]:
    from medimesh.actors.runtime import Consortium

    fed = Consortium(cfg)
    kills: list[dict[str, Any]] = []
    names = [d.name for d in fed.descriptors]
    t0 = time.perf_counter()
    try:
        fed.start()
        if drop > 0:
            fed.set_faults(drop=drop)

        def on_round(m: dict[str, Any]) -> None:
            r = int(m["round"])
            progress(f"{'chaos' if kill_every else 'clean'} round {r:>3}  top1 {m['top1']:.3f}  "
                     f"accepted {m['accepted']}  {m['duration_s'] * 1000:7.0f} ms")
            if kill_every and r % kill_every == 0 and r < cfg.rounds:
                victim = names[(r // kill_every - 1) % len(names)]
                fed.kill_hospital(victim)  # the next round is already in flight
                kills.append({"after_round": r, "hospital": victim})

        history = fed.run(on_round)
        wall = time.perf_counter() - t0
        top1 = _score(fed)
        entries = fed.audit_entries()
        audit = fed.verify_audit()
        status = fed.node_status()
        router = fed.router_stats()
    finally:
        fed.shutdown()
    events = Counter(e.event for e in entries)
    seqs = [e.seq for e in entries]
    return {
        "top1": top1,
        "rounds_completed": len(history),
        "last_round": history[-1]["round"] if history else 0,
        "accepted_per_round_min": min((m["accepted"] for m in history), default=0),
        "round_retries": events.get("round_failed", 0),
        "setup_resent": events.get("setup_resent", 0),
        "hospital_kills": kills,
        "dropped_envelopes": int(sum(p.get("dropped", 0) for p in router["peers"].values())),
        "routed_envelopes": int(sum(router["messages_by_type"].values())),
        "audit_ok": bool(audit["ok"]),
        "audit_entries": int(audit["entries"]),
        "audit_seq_gapless": seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True,
        "node_status_at_end": status,
        "wall_s": round(wall, 1),
    }


def run_chaos(
    cfg: Any, drop: float, kill_every: int, progress: Any = print
) -> dict[str, Any]:
    """Clean run, then the chaos run; the verdict fields say whether the targets were met."""
    clean = _one(cfg, 0.0, 0, progress)
    chaos = _one(dataclasses.replace(cfg), drop, kill_every, progress)
    drop_pts = (clean["top1"] - chaos["top1"]) * 100
    return {
        "benchmark": "chaos",
        "dataset": cfg.dataset,
        "hospitals": cfg.n_sites,
        "rounds": cfg.rounds,
        "drop": drop,
        "kill_every": kill_every,
        "round_timeout_s": cfg.round_timeout_s,
        "clean": clean,
        "chaos": chaos,
        "accuracy_drop_points": round(drop_pts, 2),
        "completed": chaos["rounds_completed"] == cfg.rounds,
        "within_2_points": drop_pts <= 2.0,
        "audit_verifies_without_gaps": chaos["audit_ok"] and chaos["audit_seq_gapless"],
    }
