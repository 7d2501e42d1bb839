"""The validator's statistical policy: who is excluded this round, sized by the declared f.

State in, state out (FedJAX style): :func:`judge_round` takes the standing of every hospital
and one round's protocol-clean updates, and returns each hospital's judgement, the audit
events it causes, and the new standing. No I/O: the validator actor checkpoints
:meth:`Reputation.to_dict` so a restarted validator keeps what it knew.

The rules (issue 13: defaults must never silently drop honest data):

- **f = 0 declared** (the default): scores are computed and every flag is audited, but nobody
  is excluded on statistics. Protocol violations are refused elsewhere, at once.
- **f > 0**: at most ``min(f, (m - 1) // 2)`` of the round's m updates are excluded, the most
  severe suspects first (severity: how far each flag is past its threshold, plus half the
  hospital's strikes). A flagged hospital beyond the budget is accepted, and its flags are
  still audited.
- **No permanent exile**: a flag adds a strike; a clean round halves the strikes. At
  ``quarantine_strikes`` (2: two flags without a clean round between them) a hospital is on
  probation: it stays a suspect (excluded while the budget allows, kept out of everyone's
  reference) until ``readmit_after`` (3) clean rounds in a row in which its direction could
  be judged and agreed with the others (cosine >= 0) re-admit it — or ``readmit_quiet`` (12)
  rounds without a flag, judged or not, so an honest site is never held out for good because
  training converged (late rounds close the consensus gate). Absence of evidence counts four
  times less than evidence: with 8 quiet rounds, three sign-flippers of ten were re-admitted
  in round 12 of 20 and cost 2.2 points of top-1 (in-process replica of the rare bench).
  Under f = 0 strikes are counted but nobody is quarantined.
- **Heterogeneity**: each hospital's own recent norms (``history_len``) feed the norm test, so
  a site that always sends large updates (rare diseases, many rows) is compared with itself.
- **Framing**: of a duplicate pair only the less established / later sender is flagged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medimesh.errors import ConfigError
from medimesh.scoring import Flag, RoundScore, Thresholds, score_round

__all__ = ["Judgement", "Policy", "Reputation", "RoundOutcome", "Standing", "judge_round"]


@dataclass(frozen=True, slots=True)
class Policy:
    """What the consortium declared (``tolerate`` = f) and how evidence accumulates."""

    tolerate: int = 0
    quarantine_strikes: float = 2.0
    decay: float = 0.5
    readmit_after: int = 3
    readmit_quiet: int = 12
    history_len: int = 5
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        if self.tolerate < 0:
            raise ConfigError("the declared tolerance f must be zero or positive")
        if self.quarantine_strikes <= 0 or not 0 <= self.decay < 1:
            raise ConfigError("quarantine_strikes must be > 0 and decay in [0, 1)")
        if self.readmit_after < 1 or self.history_len < 1 or self.readmit_quiet < 1:
            raise ConfigError("readmit_after, readmit_quiet and history_len must be at least 1")


@dataclass(frozen=True, slots=True)
class Standing:
    """One hospital's record with the validator."""

    strikes: float = 0.0
    quarantined: bool = False
    clean_streak: int = 0
    norms: tuple[float, ...] = ()
    quiet: int = 0  # rounds on probation without a flag (judged or not)

    def to_dict(self) -> dict[str, Any]:
        return {"strikes": self.strikes, "quarantined": self.quarantined,
                "clean_streak": self.clean_streak, "norms": list(self.norms),
                "quiet": self.quiet}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Standing:
        return cls(float(d["strikes"]), bool(d["quarantined"]), int(d["clean_streak"]),
                   tuple(float(v) for v in d["norms"]), int(d.get("quiet", 0)))


@dataclass(frozen=True, slots=True)
class Reputation:
    """Every hospital's standing after ``round``."""

    round: int = 0
    standings: Mapping[str, Standing] = field(default_factory=dict)

    def get(self, hospital: str) -> Standing:
        return self.standings.get(hospital, Standing())

    @property
    def quarantined(self) -> list[str]:
        return sorted(h for h, s in self.standings.items() if s.quarantined)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round,
                "standings": {h: s.to_dict() for h, s in sorted(self.standings.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reputation:
        try:
            return cls(int(d["round"]),
                       {h: Standing.from_dict(s) for h, s in d["standings"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"unreadable validator state: {exc}") from None


@dataclass(frozen=True, slots=True)
class Judgement:
    """The policy's decision on one hospital's update this round."""

    hospital: str
    excluded: bool
    reasons: tuple[str, ...]  # why excluded; empty when accepted
    flags: tuple[Flag, ...]  # all evidence, audited even when accepted
    score: RoundScore | None
    severity: float = 0.0
    extra: Mapping[str, float] = field(default_factory=dict)

    def audit_scores(self) -> dict[str, float]:
        """Scores plus ``<reason>.score`` / ``<reason>.threshold`` for every flag."""
        out = self.score.numbers() if self.score is not None else {}
        for f in self.flags:
            out[f"{f.reason}.score"] = f.score
            out[f"{f.reason}.threshold"] = f.threshold
        if self.severity:
            out["severity"] = self.severity
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    judgements: dict[str, Judgement]
    events: list[tuple[str, str, dict[str, Any]]]  # (event, hospital, body) for the audit
    state: Reputation


def judge_round(
    state: Reputation,
    policy: Policy,
    round_: int,
    updates: Mapping[str, np.ndarray],
    arrival: Sequence[str] | None = None,
    previous: np.ndarray | None = None,
) -> RoundOutcome:
    """Judge one round's protocol-clean updates (one per hospital, keyed by hospital)."""
    names = list(arrival) if arrival is not None else sorted(updates)
    # Precedence for duplicates: established hospitals (long clean streaks) before others,
    # then arrival order. The copy of an honest update is the newer, less known sender.
    order = sorted(names, key=lambda h: (-state.get(h).clean_streak, names.index(h)))
    suspects = {h for h in updates if state.get(h).quarantined}
    scores = score_round(
        updates,
        arrival=order,
        history={h: state.get(h).norms for h in updates},
        previous=previous,
        suspects=suspects,
        thresholds=policy.thresholds,
    )
    severity = {
        h: s.severity + (0.5 * state.get(h).strikes if h in suspects else 0.0)
        for h, s in scores.items()
    }
    candidates = [h for h in scores if scores[h].flags or h in suspects]
    budget = min(policy.tolerate, max((len(updates) - 1) // 2, 0))
    ranked = sorted(candidates, key=lambda h: (-severity[h], h))
    excluded = set(ranked[:budget])

    judgements: dict[str, Judgement] = {}
    standings = dict(state.standings)
    events: list[tuple[str, str, dict[str, Any]]] = []
    for h, s in scores.items():
        reasons: tuple[str, ...] = ()
        extra: dict[str, float] = {}
        if h in excluded:
            reasons = s.reasons or ("quarantined",)
        if h in suspects:  # on probation: clean rounds so far against those needed
            extra = {"quarantined.score": float(state.get(h).clean_streak),
                     "quarantined.threshold": float(policy.readmit_after)}
        judgements[h] = Judgement(h, h in excluded, reasons, s.flags, s,
                                  severity[h] if h in candidates else 0.0, extra)
        old = state.get(h)
        norms = (*old.norms, s.norm)[-policy.history_len :]
        # On probation, a clean round counts only if the round could judge the hospital's
        # direction (the others agreed) and it pointed with them (cosine >= 0): late in
        # training nothing is judged, and silence — or merely not opposing enough to be
        # flagged — is no evidence of honesty. Quiet rounds still end probation, later.
        judged = not old.quarantined or (
            s.loo_consensus >= policy.thresholds.consensus and s.loo_cosine >= 0.0
        )
        if s.flags:
            new = Standing(old.strikes + 1.0, old.quarantined, 0, norms, 0)
        else:
            new = Standing(old.strikes * policy.decay if judged else old.strikes,
                           old.quarantined, old.clean_streak + (1 if judged else 0), norms,
                           old.quiet + 1 if old.quarantined else 0)
        if policy.tolerate > 0 and not new.quarantined and new.strikes >= policy.quarantine_strikes:
            new = replace(new, quarantined=True)
            events.append(("hospital_quarantined", h, {
                "strikes": new.strikes, "threshold": policy.quarantine_strikes,
                "last_reasons": list(s.reasons), "readmit_after_clean_rounds": policy.readmit_after,
            }))
        elif new.quarantined and (
            new.clean_streak >= policy.readmit_after or new.quiet >= policy.readmit_quiet
        ):
            events.append(("hospital_readmitted", h, {
                "clean_rounds": new.clean_streak, "quiet_rounds": new.quiet,
                "needed": {"clean_rounds": policy.readmit_after,
                           "quiet_rounds": policy.readmit_quiet},
            }))
            new = Standing(0.0, False, new.clean_streak, norms, 0)
        standings[h] = new
    return RoundOutcome(judgements, events, Reputation(round_, standings))
