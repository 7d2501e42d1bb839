"""Round bookkeeping for the coordinator: what arrived, what was judged, when to close.

Pure state; the coordinator actor feeds it decoded messages and asks whether the round may
close. A round closes when every expected hospital is *answered* (a verdict, and for accepted
verdicts the update itself) or when the deadline passes. Closing needs ``min_updates``
accepted updates; anything arriving after close is reported as late, never silently dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medimesh.aggregation import Aggregator, fedavg, flatten
from medimesh.errors import QuorumNotReached
from medimesh.model import Model, model_hash
from medimesh.protocol import EvalReport, Update, Verdict
from medimesh.server_opt import FedAvgM, ServerOpt, ServerState
from medimesh.setup_checks import Refusal, check_eval_counts, check_eval_report

__all__ = [
    "EvalTally",
    "RoundMetrics",
    "RoundState",
    "ServerOptimizer",
    "aggregate_updates",
    "close_round",
    "describe_verdicts",
    "initial_model",
]


@dataclass(slots=True)
class RoundState:
    round: int
    base: Model
    base_hash: str
    expected: frozenset[str]
    deadline: float
    min_updates: int
    updates: dict[str, tuple[str, Update]] = field(default_factory=dict)
    verdicts: dict[str, tuple[Verdict, str]] = field(default_factory=dict)
    closed: bool = False
    late: list[str] = field(default_factory=list)
    bytes_in: int = 0
    order: tuple[str, ...] = ()

    def add_update(self, digest: str, sender: str, update: Update) -> bool:
        """Record an update the coordinator decrypted; False if it arrived after close."""
        if self.closed:
            self.late.append(digest)
            return False
        self.updates[digest] = (sender, update)
        return True

    def add_verdict(self, verdict: Verdict, verdict_digest: str) -> bool:
        if self.closed or verdict.round != self.round:
            self.late.append(verdict.update_digest)
            return False
        self.verdicts[verdict.update_digest] = (verdict, verdict_digest)
        return True

    def answered(self) -> set[str]:
        done: set[str] = set()
        for dig, (v, _) in self.verdicts.items():
            if v.hospital in self.expected and (not v.accepted or dig in self.updates):
                done.add(v.hospital)
        return done

    def complete(self) -> bool:
        return self.answered() >= self.expected

    def accepted(self) -> list[tuple[str, str, Update, str]]:
        """(update digest, sender, update, verdict digest) for accepted, present updates.

        Ordered by the hospitals' roster order (``order``), so the aggregate's floating-point
        sum, and hence the model hash, does not depend on message arrival order.
        """
        rank = {h: i for i, h in enumerate(self.order)}
        out = []
        for dig, (v, vdig) in self.verdicts.items():
            if v.accepted and dig in self.updates:
                sender, upd = self.updates[dig]
                if sender == v.hospital:
                    out.append((dig, sender, upd, vdig))
        out.sort(key=lambda t: (rank.get(t[1], len(rank)), t[0]))
        # One update per hospital: a retried round can hold a late update (and its verdict)
        # from the failed attempt next to the same hospital's new one; count only one.
        seen: set[str] = set()
        unique = []
        for t in out:
            if t[1] not in seen:
                seen.add(t[1])
                unique.append(t)
        return unique

    def rejection_reasons(self) -> Counter[str]:
        return Counter(v.reasons[0] for v, _ in self.verdicts.values() if not v.accepted)

    def explain(self, names: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(excluded, flagged): one row per refused update and per flag on an accepted one,
        naming the hospital (roster name), the reason, and the score and threshold when the
        validator measured one (protocol refusals have none)."""
        excluded: list[dict[str, Any]] = []
        flagged: list[dict[str, Any]] = []
        for v, _ in sorted(self.verdicts.values(), key=lambda t: (t[0].hospital, t[1])):
            who = names.get(v.hospital, v.hospital[:12])
            if not v.accepted:
                reason = v.reasons[0] if v.reasons else "rejected"
                excluded.append({"hospital": who, "reason": reason, **_measured(v, reason)})
            else:
                for key in sorted(v.scores):
                    if key.endswith(".threshold"):
                        reason = key[: -len(".threshold")]
                        flagged.append({"hospital": who, "reason": reason,
                                        **_measured(v, reason)})
        return excluded, flagged


_BELOW = frozenset({"opposes_others", "free_rider", "near_duplicate", "quarantined"})


def _why(row: dict[str, Any]) -> str:
    """'va opposes_others -0.61 < -0.30' (the comparison the validator made)."""
    text = f"{row['hospital']} {row['reason']}"
    if "score" in row and "threshold" in row:
        below = row["reason"] in _BELOW
        if row["reason"] == "quarantined":
            return f"{text} ({row['score']:g} of {row['threshold']:g} clean rounds to re-admission)"
        text += f" {row['score']:.3g} {'<' if below else '>'} {row['threshold']:.3g}"
    return text


def describe_verdicts(metrics: Mapping[str, Any]) -> str:
    """One line naming who was rejected and who was flagged but kept, why, with the score
    and the threshold; empty when every update was accepted without a flag."""
    parts = []
    if metrics.get("excluded"):
        parts.append("rejected: " + "; ".join(_why(r) for r in metrics["excluded"]))
    if metrics.get("flagged"):
        parts.append("flagged, kept: " + "; ".join(_why(r) for r in metrics["flagged"]))
    return "  ".join(parts)


def _measured(v: Verdict, reason: str) -> dict[str, float]:
    out = {}
    for part in ("score", "threshold"):
        value = v.scores.get(f"{reason}.{part}")
        if value is not None:
            out[part] = value
    return out


ServerOptimizer = FedAvgM
"""FedAvgM under the name earlier code used (``ServerOptimizer(lr, momentum)``)."""
_PLAIN_FEDAVG = FedAvgM()  # lr 1, no momentum: the aggregate is the step


def aggregate_updates(updates: Sequence[Update], rule: Aggregator = fedavg) -> np.ndarray:
    """The rule applied to flattened deltas, weighted by example counts."""
    vecs = [flatten(u.delta_w, u.delta_b) for u in updates]
    return rule(vecs, [float(u.n_examples) for u in updates])


def close_round(
    state: RoundState,
    rule: Aggregator = fedavg,
    server: ServerOpt = _PLAIN_FEDAVG,
    opt_state: ServerState | None = None,
) -> tuple[Model, ServerState, list[str], list[str]]:
    """Aggregate accepted updates and take one server step from ``opt_state``:
    (model, new optimizer state, update digests, verdict digests)."""
    acc = state.accepted()
    state.closed = True
    if len(acc) < state.min_updates:
        raise QuorumNotReached(
            f"round {state.round}: {len(acc)} accepted update(s), {state.min_updates} required"
        )
    agg = aggregate_updates([u for _, _, u, _ in acc], rule)
    model, new_state = server.step(state.base, agg, opt_state)
    return model, new_state, [d for d, _, _, _ in acc], [v_ for _, _, _, v_ in acc]


@dataclass(slots=True)
class EvalTally:
    """Sums hospitals' evaluation counts into accuracy over the union of test splits."""

    model_hash: str
    expected: frozenset[str]
    # Each site's test size committed at setup: no report may count more patients
    # (medimesh.setup_checks); None = not known (bounds checked among the counts only).
    test_sizes: Mapping[str, int] | None = None
    reports: dict[str, EvalReport] = field(default_factory=dict)
    # Sites whose report for this model was refused: they answered (nothing to wait for), but
    # their counts are left out of the accuracy.
    refused: set[str] = field(default_factory=set)

    def add(self, sender: str, report: EvalReport) -> Refusal | None:
        """Count a site's report, or refuse it (returned, for the audit trail): counts that
        no test split could produce never reach the published accuracy."""
        if report.model_hash != self.model_hash or sender not in self.expected:
            return None
        limit = None if self.test_sizes is None else self.test_sizes.get(sender, 0)
        refusal = check_eval_report(report, limit)
        if refusal is None:
            self.reports[sender] = report
        else:
            self.refused.add(sender)
        return refusal

    def add_from_update(self, sender: str, update: Update) -> Refusal | None:
        """Updates carry their site's evaluation of the base model they were trained from."""
        return self.add_counts(sender, update.round, update.base_hash, update.eval)

    def add_counts(
        self, sender: str, round_: int, base_hash: str, ev: dict[str, float]
    ) -> Refusal | None:
        """Evaluation counts of round ``round_``'s base model (plain or masked updates)."""
        try:
            n, top1, top3, loss = (
                float(ev[k]) for k in ("n_examples", "correct_top1", "correct_top3", "loss_sum")
            )
        except (KeyError, TypeError, ValueError):
            return Refusal("eval_malformed", math.nan, math.nan)
        limit = None if self.test_sizes is None else self.test_sizes.get(sender, 0)
        refusal = check_eval_counts(n, top1, top3, loss, limit)
        if refusal is not None:
            if base_hash != self.model_hash or sender not in self.expected:
                return None
            self.refused.add(sender)
            return refusal
        report = EvalReport(round_ - 1, base_hash, int(n), int(top1), int(top3), loss)
        return self.add(sender, report)

    def complete(self) -> bool:
        """Every expected site answered: a counted report or a refused one."""
        return set(self.reports) | self.refused >= self.expected

    def summary(self) -> dict[str, float]:
        n = sum(r.n_examples for r in self.reports.values())
        if n == 0:
            return {"n_eval": 0, "top1": float("nan"), "top3": float("nan"), "loss": float("nan")}
        return {
            "n_eval": n,
            "top1": sum(r.correct_top1 for r in self.reports.values()) / n,
            "top3": sum(r.correct_top3 for r in self.reports.values()) / n,
            "loss": sum(r.loss_sum for r in self.reports.values()) / n,
        }


@dataclass(frozen=True, slots=True)
class RoundMetrics:
    """One row of the training history (what demo, bench and /rounds report)."""

    round: int
    model_hash: str
    parent_hash: str
    accepted: int
    rejected: int
    reasons: dict[str, int]
    late: int
    top1: float
    top3: float
    loss: float
    n_eval: int
    evaluated_by: int
    duration_s: float
    bytes_routed: int
    phases_ms: dict[str, float]
    # Differential privacy: (ε, δ) spent after this round (cumulative); None without DP,
    # and then left out of the dict so non-DP metrics keep their shape.
    epsilon: float | None = None
    delta: float | None = None
    # Who was refused or flagged, why, with the score and the threshold (issue 13: every
    # exclusion names who, why, score and threshold; flags on accepted updates are shown too).
    excluded: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    aggregation: dict[str, Any] = field(default_factory=dict)  # the rule that closed the round

    def to_dict(self) -> dict[str, Any]:
        optional = ("epsilon", "delta")
        return {
            k: getattr(self, k)
            for k in self.__slots__
            if k not in optional or getattr(self, k) is not None
        }


def initial_model(n_features: int, n_classes: int, prior: np.ndarray) -> tuple[Model, str]:
    from medimesh.model import init_model

    m = init_model(n_features, n_classes, prior).astype32()
    return m, model_hash(m)
