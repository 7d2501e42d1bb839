"""``medimesh bench rounds``: startup time and per-round wall time of the full protocol.

``--transport axl`` runs the same consortium twice in one Ray, once with the hospitals pushed
to by the router (in-Ray path) and once with the hospitals reached only through the AXL front
over HTTP (``medimesh.actors.axl_hospital``), and reports both; ``--delay`` (± ``--jitter``)
is the router's per-hop delay on every delivery, pushed or into a mailbox, for both runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["AXL_HOSPITALS_AS", "run_rounds"]

AXL_HOSPITALS_AS = (
    "Ray actors that poll the AXL front over HTTP (AxlTransport: GET /recv, POST /send); the "
    "router never pushes to them. Coordinator, validator and auditor as in the in-Ray run."
)


def run_rounds(
    cfg: Any, progress: Any = None, *, transport: str = "ray", delay_s: float = 0.0,
    jitter_s: float = 0.0,
) -> dict[str, Any]:
    """Each round: train, seal, route, validate, aggregate, publish, evaluate, audit."""
    if transport == "ray":
        return _one(cfg, progress, delay_s, jitter_s)
    in_ray = _one(dataclasses.replace(cfg, hospital_transport="ray"), progress, delay_s,
                  jitter_s)
    over_axl = _one(dataclasses.replace(cfg, hospital_transport="axl"), progress, delay_s,
                    jitter_s)
    return {
        "benchmark": "rounds",
        "transport": "axl",
        "hospitals_as": AXL_HOSPITALS_AS,
        "dataset": cfg.dataset,
        "hospitals": cfg.n_sites,
        "rounds": cfg.rounds,
        "delay_s": delay_s,
        "jitter_s": jitter_s,
        "in_ray": in_ray,
        "axl": over_axl,
        "axl_p50_over_in_ray_p50": round(
            over_axl["round_ms"]["p50"] / in_ray["round_ms"]["p50"], 3
        ),
    }


def _one(cfg: Any, progress: Any, delay_s: float, jitter_s: float = 0.0) -> dict[str, Any]:
    from medimesh.actors.runtime import Consortium

    fed = Consortium(cfg)
    try:
        timings = fed.start()
        if delay_s:
            fed.set_faults(delay_s=delay_s, jitter_s=jitter_s)
        history = fed.run(progress)
        stats = fed.router_stats()
        audit = fed.verify_audit()
    finally:
        fed.shutdown()
    ms = np.array([m["duration_s"] for m in history]) * 1000.0
    n_updates = stats["messages_by_type"].get("update", 0)
    return {
        "benchmark": "rounds",
        "hospital_transport": cfg.hospital_transport,
        "delay_s": delay_s,
        "jitter_s": jitter_s,
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
