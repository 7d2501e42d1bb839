"""``medimesh bench byzantine``: statistical attacks against the default defence (or every rule).

ByzFL-style report for one dataset and one declared number of Byzantine hospitals f
(``--malicious``; the last f sites cheat): for every attack the mean and minimum top-1 over
``--seeds`` runs, the clean mean, and the **worst case over all attacks** (the attack with the
lowest mean top-1, and its drop against clean). Every run, the clean one included, declares
the same tolerance f: a consortium configures its defence without knowing whether anyone
cheats. "default" is the default defence (validator scoring + the default rule); named rules
(``--rules all``) run without validator scoring, so each rule's own robustness shows.

What the validator did comes from the audit trail only — ``verdict`` bodies (``hospital``,
``accepted``, ``reasons``) and ``hospital_quarantined`` / ``hospital_readmitted`` events — so
the report means the same whatever the validator's internals: honest updates rejected,
honest hospitals excluded (a statistical rejection or a quarantine), malicious updates
caught, per-round accepted/rejected sites with reasons, and for framing attacks whether the
framed victim (:func:`medimesh.attacks.framing_victim`) was ever excluded.

Accuracy is the final model's, scored here on every site's test split with the federation's
own standardization: on heart the headline is FLamby's metric, the mean over the four centres
of per-centre top-1; elsewhere top-1 over the union of the sites' test splits.

Protocol attacks run once each against the default (not per seed): the audit trail must hold
a refusal with the attack's specific reason for every malicious message.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medimesh.adversary import EXPECTED_REASON, PROTOCOL_ATTACKS
from medimesh.aggregation import DEFAULT
from medimesh.attacks import framing_victim
from medimesh.audit import AuditEntry
from medimesh.errors import ConfigError, QuorumNotReached
from medimesh.scoring import SCORE_REASONS
from medimesh.validation import REASONS

__all__ = ["RULES", "STATISTICAL", "audit_summary", "names_from", "run_byzantine", "summarize"]

STATISTICAL = (
    "sign_flip", "scaling", "gaussian_noise", "label_flip", "alie", "ipm", "free_rider",
    "backdoor_drift", "min_max", "min_sum", "relay", "frame_duplicate", "frame_oppose",
)
RULES = (
    "fedavg", "median", "trimmed_mean", "multi_krum", "norm_clipping", "centered_clipping",
    "default",
)
# Per-update protocol refusals; any other rejection reason is a statistical judgement
# (scoring, quarantine, or whatever reason a later validator adds).
PROTOCOL_REASONS = frozenset(REASONS) - frozenset(SCORE_REASONS) - {"quarantined"}

Progress = Callable[[str], None]


def names_from(text: str | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """A comma-separated selection: ``None`` or ``"all"`` means every allowed name."""
    if text is None or text.strip() == "all":
        return tuple(allowed)
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ConfigError(f"unknown {what}(s) {unknown or [text]}; choose from {list(allowed)}")
    return names


def audit_summary(
    entries: Iterable[AuditEntry],
    names: Mapping[str, str],
    malicious: Iterable[str],
    victim: str | None = None,
) -> dict[str, Any]:
    """What the validator did to whom, from the audit trail; ``names`` maps peer id -> site."""
    bad = set(malicious)
    rounds: dict[int, dict[str, Any]] = {}
    honest = dishonest = honest_rejected = caught = 0
    excluded: set[str] = set()
    quarantined: list[str] = []
    readmitted: list[str] = []
    for e in entries:
        if e.event in ("hospital_quarantined", "hospital_readmitted"):
            site = names.get(e.subject, e.subject[:12])
            (quarantined if e.event == "hospital_quarantined" else readmitted).append(site)
            if site not in bad and e.event == "hospital_quarantined":
                excluded.add(site)
            continue
        if e.event != "verdict":
            continue
        site = names.get(str(e.body["hospital"]), str(e.body["hospital"])[:12])
        accepted = bool(e.body["accepted"])
        reasons = [str(r) for r in e.body.get("reasons", [])]
        # A round that missed quorum is retried under the same number: sites and reasons are
        # merged over its attempts, and the verdicts counted.
        row = rounds.setdefault(
            e.round, {"verdicts": 0, "accepted": set(), "rejected": {}}
        )
        row["verdicts"] += 1
        if accepted:
            row["accepted"].add(site)
        else:
            row["rejected"].setdefault(site, set()).update(reasons)
        if site in bad:
            dishonest += 1
            caught += not accepted
        else:
            honest += 1
            honest_rejected += not accepted
            if not accepted and any(r not in PROTOCOL_REASONS for r in reasons):
                excluded.add(site)
    per_round = []
    for r in sorted(rounds):
        row = rounds[r]
        per_round.append({
            "round": r,
            "n_accepted": len(row["accepted"]),
            "n_rejected": len(row["rejected"]),
            "accepted": sorted(row["accepted"]),
            "rejected": {k: sorted(v) for k, v in sorted(row["rejected"].items())},
            "verdicts": row["verdicts"],
        })
    out: dict[str, Any] = {
        "honest_updates": honest,
        "honest_rejected": honest_rejected,
        "honest_excluded": sorted(excluded),
        "malicious_updates": dishonest,
        "malicious_caught": caught,
        "quarantined": quarantined,
        "readmitted": readmitted,
        "rounds": per_round,
    }
    if victim is not None:
        out["victim"] = victim
        out["victim_excluded"] = victim in excluded
    return out


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def summarize(runs: Sequence[Mapping[str, Any]], clean_mean: float | None) -> dict[str, Any]:
    """One attack (or the clean case) over seeds: accuracy and what the validator did."""
    top1 = [float(r["top1"]) for r in runs]
    honest = sum(int(r["honest_updates"]) for r in runs)
    rejected = sum(int(r["honest_rejected"]) for r in runs)
    out: dict[str, Any] = {
        "top1_mean": float(np.mean(top1)),
        "top1_min": float(np.min(top1)),
        "top1_per_seed": top1,
        "honest_rejected": rejected,
        "honest_updates": honest,
        "honest_rejected_rate": _rate(rejected, honest),
        "honest_excluded": sorted({s for r in runs for s in r["honest_excluded"]}),
        "runs_with_honest_excluded": sum(bool(r["honest_excluded"]) for r in runs),
        "malicious_caught": sum(int(r["malicious_caught"]) for r in runs),
        "malicious_updates": sum(int(r["malicious_updates"]) for r in runs),
        "failed_runs": sum("failed" in r for r in runs),
    }
    if clean_mean is not None:
        out["drop_vs_clean"] = clean_mean - out["top1_mean"]
    if any("victim" in r for r in runs):
        out["victim"] = next(r["victim"] for r in runs if "victim" in r)
        out["runs_victim_excluded"] = sum(bool(r.get("victim_excluded")) for r in runs)
        out["victim_ever_excluded"] = out["runs_victim_excluded"] > 0
    out["runs"] = list(runs)
    return out


def _score_final(final: Mapping[str, Any], descriptors: Sequence[Any]) -> dict[str, Any]:
    """Per-site and union top-1 of the final model, with the federation's standardization."""
    from medimesh.bench.baselines import prepare
    from medimesh.features import Standardizer
    from medimesh.metrics import evaluate
    from medimesh.model import Model
    from medimesh.sites import dataset_info, load_site

    info = dataset_info(descriptors[0].kind, descriptors[0].params)
    mask = info.scale_mask
    std = Standardizer(np.where(mask, np.asarray(final["mean"]), 0.0),
                       np.where(mask, np.asarray(final["std"]), 1.0))
    prepared = [prepare(load_site(d), info, std) for d in descriptors]
    model = Model(np.asarray(final["weights"]), np.asarray(final["bias"]))
    per_site = {p.name: float(evaluate(model, p.x_test, p.y_test)["top1"]) for p in prepared}
    x = np.vstack([p.x_test for p in prepared])
    y = np.concatenate([p.y_test for p in prepared])
    return {
        "per_site_top1": per_site,
        "mean_of_centers_top1": float(np.mean(list(per_site.values()))),
        "union_top1": float(evaluate(model, x, y)["top1"]),
    }


def _headline(cfg: Any) -> tuple[str, str]:
    if cfg.dataset == "heart":
        return "mean_of_centers_top1", "mean over the four centres of per-centre top-1 (FLamby)"
    return "union_top1", "top-1 over the union of the hospitals' test splits"


def _run(cfg: Any, rule: str, attack: str | None, malicious: int, seed: int) -> dict[str, Any]:
    from medimesh.actors.runtime import Consortium, site_descriptors

    run_cfg = dataclasses.replace(cfg, seed=seed)
    names = [d.name for d in site_descriptors(run_cfg)]
    bad = names[len(names) - malicious :] if attack else []
    behaviours = tuple((n, attack) for n in bad if attack)
    run_cfg = dataclasses.replace(
        run_cfg,
        aggregator=DEFAULT if rule == "default" else rule,
        validator_scoring=rule == "default",
        behaviours=behaviours,
        tolerate=malicious,  # the declared tolerance, the same in the clean run
    )
    victim = framing_victim(names, dict(behaviours))
    t0 = time.perf_counter()
    fed = Consortium(run_cfg)
    failed: str | None = None
    try:
        fed.start()
        try:
            history = fed.run()
            final = fed.final_model()
        except QuorumNotReached as exc:  # the attack stalled training: that is a result too
            failed, history = str(exc).strip().splitlines()[-1], []
        entries = fed.audit_entries()  # who was refused, even when training stalled
        ids = {fed.identities[n].peer_id: n for n in names}
    finally:
        fed.shutdown()
    out: dict[str, Any] = {"seed": seed}
    if failed is not None:
        out.update(top1=0.0, failed=failed)
    else:
        scores = _score_final(final, fed.descriptors)
        out.update(top1=scores[_headline(cfg)[0]], **scores,
                   last_round_reported_top1=history[-1]["top1"])
    return {
        **out,
        "rounds_run": len(history),
        "wall_s": round(time.perf_counter() - t0, 1),
        **audit_summary(entries, ids, bad, victim),
    }


def _protocol(cfg: Any, attack: str) -> dict[str, Any]:
    """One dishonest hospital sends `attack` from round 2 on; count refusals with the reason."""
    from medimesh.actors.runtime import Consortium, site_descriptors

    names = [d.name for d in site_descriptors(cfg)]
    rounds = 4
    run_cfg = dataclasses.replace(
        cfg, rounds=rounds, round_timeout_s=5.0, behaviours=((names[-1], attack),)
    )
    fed = Consortium(run_cfg)
    try:
        fed.start()
        fed.run()
        entries = fed.audit_entries()
        attacker = fed.identities[names[-1]].peer_id
    finally:
        fed.shutdown()
    where, reason = EXPECTED_REASON[attack]
    if where == "verdict":
        hits = [
            e for e in entries
            if e.event == "verdict" and e.body["hospital"] == attacker and e.round >= 2
            and reason in e.body["reasons"]
        ]
        accepted = [
            e for e in entries
            if e.event == "verdict" and e.body["hospital"] == attacker and e.round >= 2
            and e.body["accepted"]
        ]
    else:
        hits = [e for e in entries if e.event == "message_refused" and e.body["reason"] == reason]
        accepted = []
    sent = rounds - 1
    return {
        "malicious_messages": sent,
        "refused_with_reason": min(len(hits), sent),
        "accepted": len(accepted),
        "where": where,
        "reason": reason,
        "all_refused": len(hits) >= sent and not accepted,
    }


def _worst(attacks: Mapping[str, Mapping[str, Any]], clean: float) -> dict[str, Any] | None:
    if not attacks:
        return None
    name = min(attacks, key=lambda a: attacks[a]["top1_mean"])
    w = attacks[name]
    return {"attack": name, "top1_mean": w["top1_mean"], "top1_min": w["top1_min"],
            "clean_top1_mean": clean, "drop_vs_clean": clean - w["top1_mean"]}


def run_byzantine(
    cfg: Any,
    malicious: int,
    progress: Progress,
    *,
    seeds: int = 1,
    attacks: Sequence[str] = STATISTICAL,
    rules: Sequence[str] = ("default",),
) -> dict[str, Any]:
    """Clean + every attack, ``seeds`` runs each (seeds 0..K-1), per rule; then protocol attacks.

    ``progress(line)`` is called after every run (a run takes tens of seconds).
    """
    from medimesh.actors.runtime import site_descriptors

    t0 = time.perf_counter()
    names = [d.name for d in site_descriptors(cfg)]
    if not 0 <= malicious < len(names):
        raise ConfigError(f"--malicious must be in [0, {len(names)}) for {len(names)} sites")
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    attacks = tuple(attacks) if malicious else ()
    metric, note = _headline(cfg)
    bad = names[len(names) - malicious :] if malicious else []
    total = len(rules) * (1 + len(attacks)) * seeds
    progress(f"bench byzantine: {cfg.dataset}, {len(names)} hospitals, f = {malicious} "
             f"({', '.join(bad) or 'nobody'}), {cfg.rounds} rounds, seeds 0..{seeds - 1}: "
             f"{total} runs, then {len(PROTOCOL_ATTACKS)} protocol attacks; metric {metric}")
    done = 0
    table: dict[str, Any] = {}
    for rule in rules:
        runs: dict[str, list[dict[str, Any]]] = {}
        for attack in (None, *attacks):
            label = attack or "clean"
            for seed in range(seeds):
                r = _run(cfg, rule, attack, malicious, seed)
                runs.setdefault(label, []).append(r)
                done += 1
                fail = f"  FAILED: {r['failed']}" if "failed" in r else ""
                victim = (f"  victim {r['victim']} "
                          f"{'EXCLUDED' if r['victim_excluded'] else 'kept'}"
                          if "victim" in r else "")
                progress(
                    f"[{done}/{total}] {rule:>17} {label:<15} seed {seed}  top1 {r['top1']:.3f}  "
                    f"honest rejected {r['honest_rejected']}/{r['honest_updates']}  "
                    f"excluded {','.join(r['honest_excluded']) or '-'}  malicious caught "
                    f"{r['malicious_caught']}/{r['malicious_updates']}{victim}"
                    f"  {r.get('wall_s', 0):.0f} s{fail}"
                )
        clean = summarize(runs["clean"], None)
        per_attack = {a: summarize(runs[a], clean["top1_mean"]) for a in attacks}
        under = [per_attack[a] for a in attacks]
        table[rule] = {
            "clean": clean,
            "attacks": per_attack,
            "worst_case": _worst(per_attack, clean["top1_mean"]),
            "honest_rejected_rate_under_attack": _rate(
                sum(a["honest_rejected"] for a in under), sum(a["honest_updates"] for a in under)
            ),
            "honest_excluded_under_attack": sorted(
                {s for a in under for s in a["honest_excluded"]}
            ),
        }
    protocol = {}
    for a in PROTOCOL_ATTACKS:
        protocol[a] = _protocol(cfg, a)
        progress(f"protocol {a:<20} refused {protocol[a]['refused_with_reason']}/"
                 f"{protocol[a]['malicious_messages']} ({protocol[a]['reason']})")
    return {
        "benchmark": "byzantine",
        "dataset": cfg.dataset,
        "declared_f": malicious,
        "hospitals": len(names),
        "malicious_sites": bad,
        "framing_victim": framing_victim(names, dict.fromkeys(bad, "frame_duplicate")),
        "rounds": cfg.rounds,
        "seeds": list(range(seeds)),
        "headline_metric": metric,
        "headline_metric_is": note,
        "train": {"epochs": cfg.train.epochs, "lr": cfg.train.lr, "l2": cfg.train.l2},
        "default_rule": DEFAULT,
        "worst_case": {rule: row["worst_case"] for rule, row in table.items()},
        "top1_mean": {
            rule: {"clean": row["clean"]["top1_mean"],
                   **{a: v["top1_mean"] for a, v in row["attacks"].items()}}
            for rule, row in table.items()
        },
        "rules": table,
        "protocol": protocol,
        "protocol_all_refused": all(p["all_refused"] for p in protocol.values()),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
