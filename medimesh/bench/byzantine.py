"""``medimesh bench byzantine``: every attack against every aggregation rule, plus the default.

Statistical attacks run with ``malicious`` dishonest hospitals (the last ones) for the full
number of rounds, once per rule; "default" is the default defence (validator outlier scoring +
the default robust rule), the named rules run without validator scoring so each rule's own
robustness shows (plain FedAvg's collapse included). Protocol attacks run once each against the
default, and the audit trail must hold a refusal with the attack's specific reason for every
malicious message. Every run, the clean one included, declares the same tolerance f =
``malicious``: a consortium configures its defence without knowing whether anyone cheats.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from medimesh.adversary import EXPECTED_REASON, PROTOCOL_ATTACKS
from medimesh.aggregation import DEFAULT
from medimesh.errors import QuorumNotReached

__all__ = ["RULES", "STATISTICAL", "run_byzantine"]

STATISTICAL = (
    "sign_flip", "scaling", "gaussian_noise", "label_flip", "alie", "ipm", "free_rider",
    "backdoor_drift",
)
RULES = (
    "fedavg", "median", "trimmed_mean", "multi_krum", "norm_clipping", "centered_clipping",
    "default",
)


def _run(cfg: Any, rule: str, attack: str | None, malicious: int) -> dict[str, Any]:
    from medimesh.actors.runtime import Consortium, site_descriptors

    names = [d.name for d in site_descriptors(cfg)]
    bad = names[len(names) - malicious :] if attack else []
    run_cfg = dataclasses.replace(
        cfg,
        aggregator=DEFAULT if rule == "default" else rule,
        validator_scoring=rule == "default",
        behaviours=tuple((n, attack) for n in bad if attack),
        tolerate=malicious,  # the declared tolerance, the same in the clean run
    )
    fed = Consortium(run_cfg)
    try:
        fed.start()
        history = fed.run()
        entries = fed.audit_entries()
        ids = {fed.identities[n].peer_id: n for n in names}
    except QuorumNotReached as exc:  # the attack stalled training: that is a result too
        return {"top1": 0.0, "failed": str(exc), "honest_rejected": 0, "honest_updates": 0,
                "malicious_caught": 0, "malicious_updates": 0, "rounds": 0}
    finally:
        fed.shutdown()
    verdicts = [e.body for e in entries if e.event == "verdict"]
    honest = [v for v in verdicts if ids.get(v["hospital"]) not in bad]
    dishonest = [v for v in verdicts if ids.get(v["hospital"]) in bad]
    return {
        "top1": history[-1]["top1"],
        "honest_rejected": sum(not v["accepted"] for v in honest),
        "honest_updates": len(honest),
        "malicious_caught": sum(not v["accepted"] for v in dishonest),
        "malicious_updates": len(dishonest),
        "rounds": len(history),
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


def run_byzantine(cfg: Any, malicious: int, progress: Any) -> dict[str, Any]:
    """``progress(line)`` is called after every run (the full matrix takes minutes)."""
    t0 = time.perf_counter()
    table: dict[str, dict[str, Any]] = {}
    for rule in RULES:
        row: dict[str, Any] = {"clean": _run(cfg, rule, None, malicious)}
        for attack in STATISTICAL:
            row[attack] = _run(cfg, rule, attack, malicious)
            progress(f"{rule:>18} {attack:<15} top1 {row[attack]['top1']:.3f} "
                     f"(clean {row['clean']['top1']:.3f})")
        table[rule] = row
    protocol = {}
    for a in PROTOCOL_ATTACKS:
        protocol[a] = _protocol(cfg, a)
        progress(f"protocol {a:<20} refused {protocol[a]['refused_with_reason']}/"
                 f"{protocol[a]['malicious_messages']} ({protocol[a]['reason']})")
    default = table["default"]
    clean = default["clean"]["top1"]
    worst_drop = max(clean - default[a]["top1"] for a in STATISTICAL)
    honest_total = sum(r["honest_updates"] for r in [default["clean"]])
    return {
        "benchmark": "byzantine",
        "dataset": cfg.dataset,
        "hospitals": cfg.n_sites,
        "malicious": malicious,
        "rounds": cfg.rounds,
        "default_rule": DEFAULT,
        "top1": {rule: {k: v["top1"] for k, v in row.items()} for rule, row in table.items()},
        "detail": table,
        "default_worst_drop_vs_clean": worst_drop,
        "default_clean_honest_rejected_rate": (
            default["clean"]["honest_rejected"] / honest_total if honest_total else 0.0
        ),
        "default_honest_rejected_rate_under_attack": float(np.mean([
            default[a]["honest_rejected"] / max(default[a]["honest_updates"], 1)
            for a in STATISTICAL
        ])),
        "protocol": protocol,
        "protocol_all_refused": all(p["all_refused"] for p in protocol.values()),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
