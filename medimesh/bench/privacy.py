"""``medimesh bench privacy``: accuracy against ε, and the cost of secure aggregation.

Part 1 runs the real federation (Ray actors, router, validator, coordinator) once per
(ε, mode, repeat) with DP-FedAvg, and scores each final model on every hospital's test split
(for heart: FLamby's mean of per-center accuracy). A non-DP run with the same data is the
reference. Scoring needs every site's test rows, so (as in ``bench accuracy``) the benchmark
rebuilds the sites in its own process after training; the federation itself never does.

Part 2 runs the secure-aggregation protocol (:mod:`medimesh.secagg`: X25519, ChaCha20 masks,
Shamir shares, Ed25519 signatures) with ``secagg_hospitals`` hospitals on vectors of the
model's size, with 0 %, 10 % and 30 % dropouts (before and after sending the masked vector),
and reports time and bytes per round beside the plaintext baseline (one float32 vector per
hospital), plus the measured quantization error against its stated bound. Part 3
(:func:`secagg_actor_overhead`) measures the same at 0/10/30 % dropouts on the *real actor
path* (``RunConfig.secure_aggregation``: router, validator, coordinator as SecAgg server,
dropouts as ``secagg_dropout`` drill hospitals), beside a plaintext FedAvg run of the same
configuration.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from medimesh.errors import QuorumNotReached
from medimesh.identity import Identity
from medimesh.privacy import DpMode, PrivacyConfig
from medimesh.secagg import SecAggParams, run_protocol

__all__ = ["DEFAULT_EPSILONS", "run_privacy", "secagg_actor_overhead", "secagg_overhead"]

DEFAULT_EPSILONS = (0.1, 0.3, 1.0, 3.0, 10.0)
DROPOUTS = (0.0, 0.1, 0.3)


def _score(final: dict[str, Any], descriptors: Sequence[Any]) -> dict[str, Any]:
    """Per-center and pooled test accuracy of a final model (the bench's own process)."""
    from medimesh.bench.baselines import prepare
    from medimesh.features import Standardizer
    from medimesh.metrics import evaluate
    from medimesh.model import Model
    from medimesh.sites import dataset_info, load_site

    info = dataset_info(descriptors[0].kind, descriptors[0].params)
    sites = [load_site(d) for d in descriptors]
    # The federation's own standardization (from its setup round), not a re-computed one.
    std = Standardizer(np.asarray(final["mean"]), np.asarray(final["std"]))
    mask = info.scale_mask
    std = Standardizer(np.where(mask, std.mean, 0.0), np.where(mask, std.std, 1.0))
    prepared = [prepare(s, info, std) for s in sites]
    model = Model(np.asarray(final["weights"]), np.asarray(final["bias"]))
    per_center = [float(evaluate(model, p.x_test, p.y_test)["top1"]) for p in prepared]
    x = np.vstack([p.x_test for p in prepared])
    y = np.concatenate([p.y_test for p in prepared])
    return {
        "mean_of_centers_top1": float(np.mean(per_center)),
        "per_center_top1": per_center,
        "union_top1": float(evaluate(model, x, y)["top1"]),
    }


def _federated(cfg: Any) -> dict[str, Any]:
    """One run of the real system; returns scores, per-round ε and wall time."""
    from medimesh.actors.runtime import Consortium

    t0 = time.perf_counter()
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
        final = fed.final_model()
        entries = fed.audit_entries()
        z = fed.privacy.z if fed.privacy is not None else None
    finally:
        fed.shutdown()
    out = _score(final, fed.descriptors)
    out["rounds_run"] = len(history)
    out["epsilon_per_round"] = [m.get("epsilon") for m in history]
    out["noise_multiplier"] = z
    out["budget_stop_audited"] = any(e.event == "privacy_budget_exhausted" for e in entries)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["mean_of_centers_top1"] for r in runs]
    return {
        "mean_of_centers_top1_mean": float(np.mean(accs)),
        "mean_of_centers_top1_min": float(np.min(accs)),
        "mean_of_centers_top1_max": float(np.max(accs)),
        "union_top1_mean": float(np.mean([r["union_top1"] for r in runs])),
        "repeats": len(runs),
        "noise_multiplier": runs[0]["noise_multiplier"],
        "final_epsilon": runs[0]["epsilon_per_round"][-1] if runs[0]["epsilon_per_round"] else None,
        "epsilon_per_round": runs[0]["epsilon_per_round"],
        "rounds_run": runs[0]["rounds_run"],
        "runs": runs,
    }


def secagg_overhead(
    n_hospitals: int,
    dim: int,
    clip: float,
    repeats: int = 5,
    dropouts: Sequence[float] = DROPOUTS,
) -> dict[str, Any]:
    """Time and bytes of one secure-aggregation round per dropout rate and dropout timing."""
    ids = [Identity.generate() for _ in range(n_hospitals)]
    peers = [i.peer_id for i in ids]
    by_peer = {i.peer_id: i for i in ids}
    max_drop = max(dropouts)
    rng = np.random.default_rng(0)
    plaintext_bytes = 4 * dim * n_hospitals  # float32 vectors, before envelopes
    rows: list[dict[str, Any]] = []
    for rate in dropouts:
        k = math.floor(rate * n_hospitals + 1e-9)
        for timing in ("before_masking", "after_masking") if k else ("none",):
            wall, client, server = [], [], []
            last: Any = None
            errors = []
            for rep in range(repeats):
                params = SecAggParams.for_dropout(peers, max_drop, dim, clip, round_=rep + 1)
                xs = {i + 1: rng.uniform(-clip, clip, dim) for i in range(n_hospitals)}
                dropped = frozenset(int(v) + 1 for v in rng.choice(n_hospitals, k, replace=False))
                before = dropped if timing == "before_masking" else frozenset()
                after = dropped if timing == "after_masking" else frozenset()
                t = time.perf_counter()
                res = run_protocol(params, by_peer, xs, before, after)
                wall.append(time.perf_counter() - t)
                client.append(res.client_s)
                server.append(res.server_s)
                exact = np.sum([xs[i] for i in res.included], axis=0)
                errors.append(float(np.abs(res.total - exact).max()))
                last = (res, params)
            res, params = last
            rows.append(
                {
                    "dropout": rate,
                    "dropped": k,
                    "timing": timing,
                    "threshold": params.threshold,
                    "included": len(res.included),
                    "wall_ms_median": round(1000 * statistics.median(wall), 2),
                    "client_ms_per_hospital_median": round(
                        1000 * statistics.median(client) / n_hospitals, 3
                    ),
                    "server_ms_median": round(1000 * statistics.median(server), 3),
                    "bytes_per_round": res.bytes_total,
                    "bytes_up": res.bytes_up,
                    "bytes_down": res.bytes_down,
                    "overhead_vs_plaintext": round(res.bytes_total / plaintext_bytes, 2),
                    "max_abs_error": max(errors),
                    "error_bound": params.quantizer.error_bound(len(res.included)),
                    "recovered": True,
                }
            )
    return {
        "hospitals": n_hospitals,
        "dim": dim,
        "quantizer": {"clip": clip, "bits": SecAggParams.for_dropout(
            peers, max_drop, dim, clip).quantizer.bits, "modulus_bits": 32},
        "plaintext_bytes_per_round": plaintext_bytes,
        "repeats": repeats,
        "rows": rows,
    }


def secagg_actor_overhead(
    n_hospitals: int = 10,
    rounds: int = 3,
    clip: float = 1.0,
    dropouts: Sequence[float] = DROPOUTS,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-round time and routed bytes of secure rounds through the actors, per dropout rate.

    Dropped hospitals send their masked update and never answer unmasking (the coordinator
    waits ``grace_s`` for them, then rebuilds their self-masks). The plaintext row is the same
    run with FedAvg and no secure aggregation. Rare-disease cohort: any number of sites.
    """
    from medimesh.actors.runtime import Consortium, RunConfig
    from medimesh.model import TrainConfig
    from medimesh.secagg import SecAggConfig

    max_drop = max(dropouts)
    base = RunConfig(
        dataset="rare", hospitals=n_hospitals, rounds=rounds, seed=seed, aggregator="fedavg",
        validator_scoring=False, train=TrainConfig(epochs=2, clip_norm=clip),
    )
    sa = SecAggConfig(max_dropout=max_drop, clip_norm=clip, grace_s=1.0)
    cases: list[tuple[str, float, Any]] = [("plaintext", 0.0, base)]
    for rate in dropouts:
        k = math.floor(rate * n_hospitals + 1e-9)
        drop = tuple((f"hospital-{i + 1:02d}", "secagg_dropout") for i in range(k))
        cases.append(
            (f"secure, {rate:.0%} dropouts", rate,
             dataclasses.replace(base, behaviours=drop, secure_aggregation=sa))
        )
    rows = []
    for label, rate, cfg in cases:
        fed = Consortium(cfg)
        try:
            fed.start()
            history = fed.run()
            entries = fed.audit_entries()
            ok = bool(fed.verify_audit()["ok"])
        finally:
            fed.shutdown()
        summaries = [
            e.body["secure_aggregation"] for e in entries
            if e.event == "model_published" and "secure_aggregation" in e.body
        ]
        phases: dict[str, float] = {}
        for name in history[0]["phases_ms"]:
            phases[name] = round(statistics.median(m["phases_ms"][name] for m in history), 1)
        rows.append({
            "case": label,
            "dropout": rate,
            "rounds": len(history),
            "round_ms_median": round(1000 * statistics.median(m["duration_s"] for m in history), 1),
            "bytes_routed_per_round_median": int(statistics.median(
                m["bytes_routed"] for m in history)),
            "phases_ms_median": phases,
            "summed_per_round": [s["summed"] for s in summaries],
            "answered_unmask_per_round": [s["answered_unmask"] for s in summaries],
            "threshold": summaries[0]["threshold"] if summaries else None,
            "final_top1": history[-1]["top1"],
            "audit_ok": ok,
        })
    return {
        "path": "real actors (router, validator, coordinator, hospitals on Ray)",
        "dataset": "rare",
        "hospitals": n_hospitals,
        "rounds": rounds,
        "clip": clip,
        "grace_s": sa.grace_s,
        "rows": rows,
    }


def run_privacy(
    cfg: Any,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    delta: float = 1e-3,
    dp_rounds: int = 10,
    clip_norm: float = 0.5,
    modes: Sequence[DpMode] = ("central", "local"),
    repeats: int = 3,
    secagg_hospitals: int = 10,
    say: Callable[[str], None] = lambda _line: None,
    secagg_large_dim: int = 100_000,
    server_lr: float = 0.5,
) -> dict[str, Any]:
    """The ε sweep through the real system, then the secure-aggregation overhead table."""
    t0 = time.perf_counter()
    ref_cfg = dataclasses.replace(cfg, privacy=None)
    reference = _federated(ref_cfg)
    say(f"no DP ({cfg.rounds} rounds): mean of centers {reference['mean_of_centers_top1']:.3f}")
    sweep: dict[str, dict[str, Any]] = {}
    for mode in modes:
        sweep[mode] = {}
        for eps in epsilons:
            privacy = PrivacyConfig(
                epsilon=eps, delta=delta, rounds=dp_rounds, mode=mode, clip_norm=clip_norm,
                server_lr=server_lr,
            ).calibrated()
            # Ask for one round more than planned: the budget must stop it (audited).
            run_cfg = dataclasses.replace(cfg, rounds=dp_rounds + 1, privacy=privacy)
            runs, failures = [], []
            for rep in range(repeats):
                try:
                    runs.append(_federated(dataclasses.replace(run_cfg, seed=cfg.seed + rep)))
                except QuorumNotReached as exc:  # a stalled run is a result too: report it
                    failures.append(str(exc).splitlines()[-1])
                    say(f"{mode:>7} eps={eps:<5g} run {rep} failed: {failures[-1]}")
            if not runs:
                sweep[mode][f"{eps:g}"] = {"failed": failures}
                continue
            row = {**_summary(runs), "failed_runs": failures}
            sweep[mode][f"{eps:g}"] = row
            say(
                f"{mode:>7} eps={eps:<5g} z={privacy.z:.2f}: mean of centers "
                f"{row['mean_of_centers_top1_mean']:.3f} (min {row['mean_of_centers_top1_min']:.3f}"
                f", {repeats} runs), final eps {row['final_epsilon']:.3f}"
            )
    first = cfg
    from medimesh.actors.runtime import site_descriptors
    from medimesh.sites import dataset_info

    d0 = site_descriptors(first)[0]
    info = dataset_info(d0.kind, d0.params)
    dim = (len(info.feature_names) + 1) * len(info.class_names)
    secagg = {}
    # The model's own size, and a large vector where the fixed key/share cost amortises.
    for size in (dim, secagg_large_dim):
        say(f"secure aggregation: {secagg_hospitals} hospitals, {size} values per update")
        table = secagg_overhead(secagg_hospitals, size, clip_norm, repeats=5 if size < 10**4 else 3)
        secagg[f"dim_{size}"] = table
        for r in table["rows"]:
            say(
                f"  dropout {r['dropout']:.0%} ({r['timing']}): {r['wall_ms_median']:.1f} ms, "
                f"{r['bytes_per_round']} bytes/round ({r['overhead_vs_plaintext']}x plaintext), "
                f"max error {r['max_abs_error']:.2e} <= bound {r['error_bound']:.2e}"
            )
    say(f"secure aggregation through the actors: {secagg_hospitals} hospitals (rare cohort)")
    actors = secagg_actor_overhead(secagg_hospitals, clip=clip_norm, seed=cfg.seed)
    for r in actors["rows"]:
        say(
            f"  {r['case']}: {r['round_ms_median']:.0f} ms/round, "
            f"{r['bytes_routed_per_round_median']} bytes/round, summed {r['summed_per_round']}"
        )
    return {
        "benchmark": "privacy",
        "dataset": cfg.dataset,
        "hospitals": cfg.n_sites,
        "unit_protected": "one patient record at one hospital (replace-one: counts are public)",
        "sensitivity": "2 * clip_norm (replace-one)",
        "sampling": "none: every DP round uses each hospital's full training set",
        "accountant": "dp_accounting PLD, composition of full-batch Gaussian rounds",
        "delta": delta,
        "dp_rounds": dp_rounds,
        "clip_norm": clip_norm,
        "server_lr": server_lr,
        "metric": "mean over hospitals of per-hospital test accuracy (FLamby's heart metric)",
        "reference_no_dp": reference,
        "sweep": sweep,
        "secagg": secagg,  # the protocol alone, in one process
        "secagg_actors": actors,  # the same protocol through the real actors
        "wall_s": round(time.perf_counter() - t0, 1),
    }
