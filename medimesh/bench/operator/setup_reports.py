"""Operator attacks: setup_reports (issue 15, attack 6) — a dishonest hospital poisons the
setup round or the evaluation counts; see the package docstring.

The hospital is a real enrolled hospital actor with real patients and its own key, wrapped from
outside (medimesh.actors.liars) so that it reports made-up numbers. Caught means: the
coordinator refuses the numbers with a named audit event (``setup_refused`` or
``evaluation_refused``: who, which check, value, bound), and the run goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from medimesh.bench.operator import AttackOutcome, Lab, Scenario

__all__ = ["ATTACKS", "SCENARIOS", "judge_eval", "judge_setup", "run_options", "run_with_liar"]

LIAR_SITE = 3  # the fourth of four hospitals lies
ROUNDS = 2
ROUND_TIMEOUT_S = 20.0
# The evaluation attack: a refused report leaves the coordinator's tally short of the liar, so
# every round runs to its deadline (the updates are all in within a second or two on an idle
# machine) and the final evaluation to its own (10 s): a shorter deadline, several times what a
# round needs, and one round. One round still refuses both kinds of report the liar sends — the
# counts riding on its update (of the round's base model) and the EvalReport of the final model.
EVAL_ROUNDS = 1
EVAL_ROUND_TIMEOUT_S = 8.0


def run_with_liar(
    lab: Lab, lie: str, rounds: int = ROUNDS, round_timeout_s: float = ROUND_TIMEOUT_S
) -> dict[str, Any]:
    """Four hospitals (one of them ``lie``-ing), ``rounds`` rounds, audit in a fresh PostgreSQL.

    Returns what the evidence needs: the liar's name and peer id, the audit entries (event,
    body), the history, the published standardization and checkpoint, the honest sites'
    committed sizes, and the error if the run failed.
    """
    import ray

    from medimesh.actors.liars import LIARS
    from medimesh.actors.runtime import Consortium, RunConfig, site_descriptors

    cfg = RunConfig(hospitals=4, rounds=rounds, seed=7, round_timeout_s=round_timeout_s,
                    database_url=lab.new_database(), cross_baselines=False, round_retries=0)
    liar = site_descriptors(cfg)[LIAR_SITE].name
    fed = Consortium(cfg, {liar: LIARS[lie]})
    out: dict[str, Any] = {"liar": liar, "error": None, "history": [], "committed": {},
                           "model": {"mean": None, "std": None}, "sites": {}}
    try:
        try:
            fed.start()
            out["sites"] = {i["name"]: i for i in fed.hospital_info}
            out["history"] = fed.run()
        except Exception as exc:  # e.g. a poisoned setup that stops training
            out["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[-1][:200]}"
        out["liar_id"] = fed.identities[liar].peer_id
        cp = ray.get(fed.handles["auditor"].latest_checkpoint.remote())
        if cp is not None:
            out["committed"] = dict(cp["state"]["committed"])
            out["model"] = {"mean": cp["state"]["mean"], "std": cp["state"]["std"]}
        fed.flush_store()
        out["audit"] = [(e.event, dict(e.body)) for e in fed.audit_entries()]
        out["verify"] = fed.verify_audit()
    finally:
        fed.shutdown()
    return out


def _events(run: dict[str, Any], event: str) -> list[dict[str, Any]]:
    return [body for ev, body in run["audit"] if ev == event]


def _finite(a: Any) -> bool:
    return a is not None and bool(np.all(np.isfinite(np.asarray(a, dtype=np.float64))))


def judge_setup(attack: str, run: dict[str, Any]) -> AttackOutcome:
    """A poisoned setup round, from :func:`run_with_liar`'s evidence."""
    refused = [b for b in _events(run, "setup_refused") if b.get("name") == run["liar"]]
    history = run["history"]
    trained = len(history) == ROUNDS and all(m["accepted"] == 3 for m in history)
    liar_weight = run["committed"].get(run.get("liar_id", ""), None)
    std_ok = _finite(run["model"]["std"]) and _finite(run["model"]["mean"])
    detected = bool(refused) and liar_weight is None
    losses = []
    if not std_ok:
        losses.append("the consortium's standardization is not finite")
    if run["error"] is not None:
        losses.append(f"training stopped: {run['error']}")
    elif not trained:
        accepted = [m["accepted"] for m in history]
        losses.append(f"the liar took part in the rounds (updates accepted per round {accepted})")
    if liar_weight is not None:
        losses.append(f"the liar's committed n {liar_weight} weighs every round")
    return AttackOutcome(
        attack=attack, number=6, attempted=True, detected=detected,
        by="coordinator (setup checks)" if detected else "nobody",
        how=f"setup_refused: {refused[0]['check']}" if refused else "not refused",
        honest_loss="; ".join(losses) or "nothing",
        details={"liar": run["liar"], "refusal": refused[0] if refused else None,
                 "rounds": len(history),
                 "accepted": [m["accepted"] for m in history],
                 "top1": [round(m["top1"], 4) for m in history],
                 "committed_total": int(sum(run["committed"].values())),
                 "std_finite": std_ok, "error": run["error"],
                 "audit_ok": bool(run.get("verify", {}).get("ok"))},
    )


def judge_eval(attack: str, run: dict[str, Any]) -> AttackOutcome:
    """Inflated evaluation counts (the liar trains honestly, reports 10^9 all-correct)."""
    refused = [b for b in _events(run, "evaluation_refused") if b.get("name") == run["liar"]]
    history = run["history"]
    honest_test = sum(int(i["n_test"]) for n, i in run["sites"].items() if n != run["liar"])
    n_eval = [int(m["n_eval"]) for m in history]
    clean = bool(history) and all(n == honest_test for n in n_eval)
    top1 = [m["top1"] for m in history]
    return AttackOutcome(
        attack=attack, number=6, attempted=True, detected=bool(refused) and clean,
        by="coordinator (evaluation checks)" if refused else "nobody",
        how=f"evaluation_refused: {refused[0]['check']}" if refused else "not refused",
        honest_loss="nothing" if clean else (
            f"published accuracy counts the liar's patients: n_eval {n_eval}, top1 {top1}"
        ),
        details={"liar": run["liar"], "refusals": len(refused),
                 "refusal": refused[0] if refused else None, "n_eval": n_eval,
                 "honest_test_patients": honest_test,
                 "top1": [round(t, 4) if math.isfinite(t) else None for t in top1],
                 "error": run["error"], "audit_ok": bool(run.get("verify", {}).get("ok"))},
    )


# attack -> (the lie the dishonest hospital tells, how its outcome is judged)
ATTACKS: dict[str, tuple[str, Callable[[str, dict[str, Any]], AttackOutcome]]] = {
    "setup_nan_sum": ("nan_sum", judge_setup),
    "setup_huge_sumsq": ("huge_sumsq", judge_setup),
    "setup_nan_class_counts": ("nan_class_counts", judge_setup),
    "setup_inflated_n": ("inflated_n", judge_setup),
    "eval_inflated_counts": ("inflated_eval", judge_eval),
}


def run_options(attack: str) -> dict[str, Any]:
    """``run_with_liar``'s rounds and deadline for ``attack`` (see EVAL_ROUNDS)."""
    if ATTACKS[attack][1] is judge_eval:
        return {"rounds": EVAL_ROUNDS, "round_timeout_s": EVAL_ROUND_TIMEOUT_S}
    return {}


def _scenario(attack: str) -> Scenario:
    lie, judge = ATTACKS[attack]

    def scenario(lab: Lab) -> AttackOutcome:
        return judge(attack, run_with_liar(lab, lie, **run_options(attack)))

    scenario.__name__ = attack
    return scenario


SCENARIOS: dict[str, Scenario] = {name: _scenario(name) for name in ATTACKS}
