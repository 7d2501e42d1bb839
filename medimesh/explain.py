"""Why the oracle ranks as it does, when not to trust it, and what to ask next: pure logic.

Three things a clinician needs beside the ranking (issues 14 and 17), computed only from what
the oracle legitimately holds: the published weights, the setup round's per-column mean and
standard deviation, and small aggregates published with them (:class:`TrainingProfile`).
Never a training row.

**Evidence for and against.** With model inputs ``z`` (log, then standardized), the logit of
class ``c`` relative to the mean over classes is ``b'[c] + Σ_j z_j·w'[j,c]`` with
``w' = w − mean_c w``. We split it around the *average training patient* ``z̄`` (0 for a
standardized column; for a 0/1 column its training mean, i.e. how often it was 1):
``baseline_c + Σ_j (z_j − z̄_j)·w'[j,c]`` with ``baseline_c = b'[c] + Σ_j z̄_j·w'[j,c]``. The
split is exact (the shares add up to the logit), and every column gets a share, including one
the clinician did not fill in: a symptom not mentioned has ``z = 0`` where the average
training patient has ``z̄ = prevalence``, so its share shows how the model reads the silence.
``exp(share)`` is the factor by which that finding multiplies the candidate's odds against the
average class. This is the exact Shapley value of a linear model with the training mean as
reference; it is not a causal statement.

**Out of distribution.** A query is flagged when it is unlike every row the model learnt from:
far fewer or more recorded symptoms than the training rows (from a coarse histogram the sites
publish at setup, :data:`FINDING_BINS`), a lab value or age many standard deviations from the
training mean after the model's own transform, or most entered terms unknown to the model.

**Next tests.** For each piece of evidence the query lacks (a symptom not asked about, a lab
not measured, genetic testing not done), every possible answer is encoded exactly as a
clinician would enter it, scored by the model, and the test is ranked by its largest *swing*:
the change in the probability gap between the current first and second candidates. A
discriminative model gives no probability for each answer (the oracle only knows marginal
prevalences, which ignore this patient), so the ranking is by what an answer *could* do, not
by what it is expected to do. See docs/explain.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

__all__ = [
    "FINDING_BINS",
    "LAB_PROBES",
    "OOD_MIN_SHARE",
    "OOD_Z",
    "Contribution",
    "NextTest",
    "OodReason",
    "OutOfDistribution",
    "Outcome",
    "Probe",
    "TrainingProfile",
    "baseline_words",
    "candidate_shares",
    "check_ood",
    "combine_finding_hists",
    "count_findings",
    "effect_words",
    "finding_histogram",
    "fmt_number",
    "fmt_odds",
    "fmt_pct",
    "gap_swing",
    "items_of",
    "outcome_words",
    "rank_tests",
    "reference_inputs",
    "softmax",
    "symptom_mask",
]

# Left edges of the bins of "recorded symptoms per training row" (the last bin is open). Coarse
# on purpose: a site reveals how many of its patients fall in each bin, never one patient's
# exact count at the extremes (docs/privacy.md).
FINDING_BINS: Final[tuple[int, ...]] = (
    0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 64, 80, 100,
)
OOD_Z: Final = 4.0  # |z| beyond this on the model's scale: "far outside the training range"
OOD_MIN_SHARE: Final = 0.01  # a symptom count shared by < 1 % of training rows is unusual
OOD_UNKNOWN_MIN: Final = 3  # at least this many unknown terms ...
OOD_UNKNOWN_SHARE: Final = 0.5  # ... and at least this share of all entered terms
# An unmeasured lab is probed at these points of the training distribution on the model's
# (log) scale: (standard deviations from the training mean, words).
LAB_PROBES: Final[tuple[tuple[float, str], ...]] = (
    (-2.0, "low"), (0.0, "typical"), (2.0, "high"), (3.0, "very high"),
)
MIN_SWING: Final = 0.01  # tests that cannot move the gap by one point are not suggested

Status = Literal[
    "observed", "excluded", "not_mentioned", "measured", "not_measured", "variant",
    "no_variant", "not_sequenced", "sequenced", "given", "unknown", "encoding",
]

# Indicator columns that belong to another column's explanation row (medimesh.evidence).
_PARTNER_PREFIXES: Final = ("excluded:", "measured:")


# ------------------------------------------------------------------------------- formatting


def fmt_number(v: float) -> str:
    """A number for people: ``5,200`` not ``5.2e+03``; small values to two significant digits."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 1:
        text = f"{v:.3g}"
        return text if "e" not in text else f"{v:,.0f}"
    if a == 0:
        return "0"
    digits = max(2, -math.floor(math.log10(a)) + 1)  # two significant digits
    return f"{v:.{digits}f}".rstrip("0").rstrip(".")


def fmt_pct(p: float) -> str:
    """A probability as a percentage: ``62%``, ``4.1%``, ``0.35%``."""
    q = 100.0 * p
    if q >= 9.95:
        return f"{q:.0f}%"
    if q >= 1:
        return f"{q:.1f}%"
    return f"{fmt_number(q)}%"


def fmt_odds(share: float) -> str:
    """exp(share) as an odds factor: ``×2.4`` or ``÷20`` (never below 1 after the sign)."""
    factor = math.exp(min(max(share, -50.0), 50.0))
    if factor >= 1:
        return f"×{fmt_number(factor)}"
    return f"÷{fmt_number(1.0 / factor)}"


def effect_words(candidate: str, share: float) -> str:
    """``makes Fabry disease more likely (odds ×2.4 vs the average class)``."""
    if abs(share) < 0.005:
        return f"does not change the odds of {candidate}"
    direction = "more" if share > 0 else "less"
    return f"makes {candidate} {direction} likely (odds {fmt_odds(share)} vs the average class)"


def baseline_words(candidate: str, share: float) -> str:
    """The starting point: the candidate's odds for the average training patient."""
    return (f"for the average training patient, before any of this patient's inputs, the odds "
            f"of {candidate} are {fmt_odds(share)} vs the average class")


# ------------------------------------------------------------------------- explanation core


@dataclass(frozen=True, slots=True)
class Contribution:
    """One column's exact share of a candidate's relative logit."""

    column: int
    share: float
    status: Status


def reference_inputs(mean: np.ndarray, scale_mask: np.ndarray) -> np.ndarray:
    """Model inputs of the average training patient: 0 where standardized, else the mean."""
    return np.where(np.asarray(scale_mask, dtype=bool), 0.0, np.nan_to_num(mean))


def candidate_shares(
    z: np.ndarray, z_ref: np.ndarray, weights: np.ndarray, bias: np.ndarray, c: int
) -> tuple[float, np.ndarray]:
    """``(baseline_c, shares)`` with ``baseline + shares.sum()`` = relative logit of ``c``."""
    w = np.asarray(weights, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    rel = w[:, c] - w.mean(axis=1)
    baseline = float(b[c] - b.mean() + z_ref @ rel)
    return baseline, (z - z_ref) * rel


def items_of(feature_names: Sequence[str]) -> list[tuple[int, list[int]]]:
    """Explanation rows: (primary column, all its columns) — a symptom with its
    ``excluded:`` column, a lab with its ``measured:`` indicator, anything else alone."""
    index = {n: j for j, n in enumerate(feature_names)}
    items: dict[int, list[int]] = {}
    for j, n in enumerate(feature_names):
        owner = next((n.removeprefix(p) for p in _PARTNER_PREFIXES if n.startswith(p)), None)
        primary = index.get(owner, j) if owner is not None else j
        items.setdefault(primary, []).append(j)
    return sorted(items.items())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


# ----------------------------------------------------------------------- training aggregates


def symptom_mask(feature_names: Sequence[str]) -> np.ndarray:
    """Columns that count as recorded symptoms (observed HPO terms)."""
    return np.array([n.startswith("HP:") for n in feature_names], dtype=bool)


def count_findings(x_raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Recorded (observed) symptoms per row: symptom columns with a value > 0."""
    x = np.atleast_2d(np.asarray(x_raw, dtype=np.float64))[:, mask]
    return np.asarray((np.nan_to_num(x) > 0).sum(axis=1), dtype=np.int64)


def finding_histogram(counts: np.ndarray) -> np.ndarray:
    """How many rows fall in each :data:`FINDING_BINS` bin (float64, for the wire)."""
    idx = np.searchsorted(np.asarray(FINDING_BINS), np.asarray(counts), side="right") - 1
    return np.bincount(idx, minlength=len(FINDING_BINS)).astype(np.float64)


def combine_finding_hists(
    parts: Sequence[tuple[np.ndarray | None, int]],
) -> tuple[float, ...] | None:
    """Sum the sites' histograms; None unless every site sent a valid one.

    ``parts``: (histogram, committed training rows) per site. Valid: one finite,
    non-negative whole count per bin, adding up to the site's committed rows. A partial sum
    would misdescribe the training data, so one missing or bad histogram drops the aggregate.
    """
    if not parts:
        return None
    total = np.zeros(len(FINDING_BINS))
    for hist, n in parts:
        if hist is None:
            return None
        h = np.asarray(hist, dtype=np.float64)
        if (
            h.shape != (len(FINDING_BINS),)
            or not np.all(np.isfinite(h))
            or np.any(h < 0)
            or np.any(h != np.round(h))
            or int(h.sum()) != int(n)
        ):
            return None
        total += h
    return tuple(float(v) for v in total) if total.sum() > 0 else None


@dataclass(frozen=True, slots=True)
class TrainingProfile:
    """Aggregates about the training rows published with the model (no row, no site split).

    ``finding_hist``: training rows per :data:`FINDING_BINS` bin of recorded symptoms, summed
    over the sites' setup statistics; empty when the sites did not send it (older peers).
    """

    finding_hist: tuple[float, ...] = ()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> TrainingProfile:
        """From a checkpoint/model document; anything malformed means "not available"."""
        raw = state.get("finding_hist")
        if not isinstance(raw, list | tuple | np.ndarray) or len(raw) != len(FINDING_BINS):
            return cls()
        values = [float(v) for v in raw]
        if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
            return cls()
        return cls(tuple(values))

    @property
    def rows(self) -> float:
        return float(sum(self.finding_hist))

    def shares(self, n: int) -> tuple[float, float]:
        """Share of training rows whose bin is at or below / at or above the bin of ``n``."""
        h = np.asarray(self.finding_hist)
        i = int(np.searchsorted(np.asarray(FINDING_BINS), n, side="right") - 1)
        return float(h[: i + 1].sum() / h.sum()), float(h[i:].sum() / h.sum())

    def usual_range(self, lo: float = 0.05, hi: float = 0.95) -> str:
        """Words for the bins holding the ``lo`` and ``hi`` quantiles: ``"13 to 49"``."""
        cum = np.cumsum(self.finding_hist) / self.rows
        i = int(np.searchsorted(cum, lo, side="left"))
        k = min(int(np.searchsorted(cum, hi, side="left")), len(FINDING_BINS) - 1)
        top = "or more" if k + 1 >= len(FINDING_BINS) else str(FINDING_BINS[k + 1] - 1)
        return f"{FINDING_BINS[i]} to {top}" if top != "or more" else f"{FINDING_BINS[i]} or more"


# ------------------------------------------------------------------- out of distribution


@dataclass(frozen=True, slots=True)
class OodReason:
    """Why a query is outside the training data, in words; ``feature`` names the column."""

    kind: Literal[
        "few_findings", "many_findings", "extreme_value", "rare_input", "unknown_terms"
    ]
    message: str
    feature: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "feature": self.feature}


@dataclass(frozen=True, slots=True)
class OutOfDistribution:
    """The flag is set iff there is at least one reason; ``checked`` says what was looked at."""

    reasons: tuple[OodReason, ...] = ()
    checked: tuple[str, ...] = ()

    @property
    def flag(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flag": self.flag,
            "reasons": [r.to_dict() for r in self.reasons],
            "checked": list(self.checked),
        }


def _share_words(share: float) -> str:
    return "none" if share <= 0 else f"only {fmt_pct(share)}"


# The missingness indicators the rare-input rule judges: prefix or name → (words when 0,
# words when 1); "{}" is the owner's label. ``excluded:`` columns are left out on purpose: a
# given finding is marked absent in few training rows, so its weight stays near zero (no
# evidence either way) and flagging every exclusion would make the flag noise.
INDICATOR_WORDS: Final[Mapping[str, tuple[str, str]]] = {
    "measured:": ("{} not measured", "{} measured"),
    "genetic_testing_done": ("no genetic testing", "genetic testing done"),
}


def indicator_words(name: str, owner_label: str, value: float) -> str | None:
    """Words for an indicator input at ``value`` (None if ``name`` is not an indicator)."""
    for key, (off, on) in INDICATOR_WORDS.items():
        if name == key or (key.endswith(":") and name.startswith(key)):
            return (on if value > 0 else off).format(owner_label)
    return None


def check_ood(
    *,
    n_findings: int,
    profile: TrainingProfile,
    extreme: Sequence[tuple[str, str, float, float, str]],
    n_unknown: int,
    n_terms: int,
    rare: Sequence[tuple[str, str, float]] = (),
) -> OutOfDistribution:
    """Apply the rules. ``extreme``: (feature, label, z, raw value, unit) of scaled columns;
    ``rare``: (feature, words, training share of that value) of the 0/1 indicator inputs
    (excluded / measured / genetic testing) as this query sets them."""
    reasons: list[OodReason] = []
    checked = ["extreme_value", "rare_input", "unknown_terms"]
    if profile.finding_hist:
        checked.insert(0, "findings")
        at_most, at_least = profile.shares(n_findings)
        usual = profile.usual_range()
        plural = "s" if n_findings != 1 else ""
        if at_most < OOD_MIN_SHARE:
            reasons.append(OodReason(
                "few_findings",
                f"{n_findings} recorded symptom{plural}: {_share_words(at_most)} of the "
                f"training patients had so few (90% had {usual}). The model has rarely seen so "
                "sparse a record; read its ranking with care.",
            ))
        elif at_least < OOD_MIN_SHARE:
            reasons.append(OodReason(
                "many_findings",
                f"{n_findings} recorded symptom{plural}: {_share_words(at_least)} of the "
                f"training patients had so many (90% had {usual}).",
            ))
    for name, label, zj, raw, unit in extreme:
        if abs(zj) > OOD_Z:
            side = "above" if zj > 0 else "below"
            reasons.append(OodReason(
                "extreme_value",
                f"{label} = {fmt_number(raw)} {unit}".rstrip() + f" is {abs(zj):.1f} standard "
                f"deviations {side} the training mean on the model's scale: far outside "
                "what the model learnt from, so its effect is extrapolated.",
                name,
            ))
    unusual = [(f, words, share) for f, words, share in rare if share < OOD_MIN_SHARE]
    if unusual:
        listed = "; ".join(
            f"{words} ({'no training patient' if share <= 0 else f'only {fmt_pct(share)}'})"
            for _, words, share in unusual[:4]
        )
        more = f"; and {len(unusual) - 4} more" if len(unusual) > 4 else ""
        reasons.append(OodReason(
            "rare_input",
            f"Inputs (almost) no training patient had: {listed}{more}. The model learnt "
            "little or nothing about them, so their weight in the answer is unreliable.",
            unusual[0][0],
        ))
    if n_unknown >= OOD_UNKNOWN_MIN and n_unknown >= OOD_UNKNOWN_SHARE * n_terms:
        reasons.append(OodReason(
            "unknown_terms",
            f"{n_unknown} of {n_terms} entered terms are not in the model's vocabulary and were "
            "ignored: the answer rests on the few it knows.",
        ))
    return OutOfDistribution(tuple(reasons), tuple(checked))


# ------------------------------------------------------------------------------ next tests


@dataclass(frozen=True, slots=True)
class Outcome:
    """One possible answer to a test and what the model would then say."""

    answer: str
    top: str
    top_probability: float
    gap_change: float  # change of P(current 1st) − P(current 2nd)
    probabilities: Mapping[str, float]  # the current top candidates' new probabilities
    value: float | None = None  # an assumed lab value (canonical unit), if any

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "top": self.top,
            "top_probability": self.top_probability,
            "gap_change": self.gap_change,
            "probabilities": dict(self.probabilities),
            "value": self.value,
        }


@dataclass(frozen=True, slots=True)
class NextTest:
    """A test the clinician could do next, ranked by how far one answer could move the gap."""

    kind: Literal["symptom", "biomarker", "genetic_test"]
    feature: str
    label: str
    question: str
    swing: float
    reason: str
    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "feature": self.feature,
            "label": self.label,
            "question": self.question,
            "swing": self.swing,
            "reason": self.reason,
            "outcomes": [o.to_dict() for o in self.outcomes],
        }


def gap_swing(p0: np.ndarray, p1: np.ndarray, a: int, b: int) -> float:
    """Change of the gap between candidates ``a`` (1st) and ``b`` (2nd): p0 → p1."""
    return float((p1[a] - p1[b]) - (p0[a] - p0[b]))


def outcome_words(answer: str, p0: np.ndarray, p1: np.ndarray, classes: Sequence[str]) -> str:
    """``if present: Fabry disease becomes most likely (62%, now 4.1%)``."""
    t0, t1 = int(np.argmax(p0)), int(np.argmax(p1))
    if t1 != t0:
        return (f"{answer}: {classes[t1]} becomes most likely ({fmt_pct(float(p1[t1]))}, "
                f"now {fmt_pct(float(p0[t1]))})")
    return (f"{answer}: {classes[t0]} stays most likely ({fmt_pct(float(p1[t0]))}, "
            f"now {fmt_pct(float(p0[t0]))})")


@dataclass(frozen=True, slots=True)
class Probe:
    """A test to score: its answers, each with the model's probabilities under it."""

    kind: Literal["symptom", "biomarker", "genetic_test"]
    feature: str
    label: str
    question: str
    answers: tuple[str, ...]
    proba: np.ndarray  # (len(answers), n_classes)
    values: tuple[float | None, ...] = ()


def rank_tests(
    probes: Sequence[Probe], p0: np.ndarray, classes: Sequence[str], top: int = 5,
    keep: int = 3,
) -> tuple[NextTest, ...]:
    """The ``top`` probes whose best answer moves the 1st-vs-2nd gap most (ties by name)."""
    order = np.argsort(-p0, kind="stable")
    a, b = int(order[0]), int(order[1])
    shown = [int(c) for c in order[:keep]]
    # Swing of every probe first (cheap), words only for the ones that make the list.
    swings = [
        float(np.max(np.abs((pr.proba[:, a] - pr.proba[:, b]) - (p0[a] - p0[b]))))
        if len(pr.answers) else 0.0
        for pr in probes
    ]
    ranked = sorted(
        (i for i, sw in enumerate(swings) if sw >= MIN_SWING),
        key=lambda i: (-swings[i], probes[i].feature),
    )[:top]
    scored: list[NextTest] = []
    for k in ranked:
        pr = probes[k]
        outcomes = []
        for i, answer in enumerate(pr.answers):
            p1 = pr.proba[i]
            t = int(np.argmax(p1))
            outcomes.append(Outcome(
                answer, classes[t], float(p1[t]), gap_swing(p0, p1, a, b),
                {classes[c]: float(p1[c]) for c in shown},
                pr.values[i] if i < len(pr.values) else None,
            ))
        big = sorted(range(len(outcomes)), key=lambda i: -abs(outcomes[i].gap_change))[:2]
        reason = "; ".join(outcome_words(pr.answers[i], p0, pr.proba[i], classes)
                           for i in sorted(big))
        scored.append(NextTest(pr.kind, pr.feature, pr.label, pr.question, swings[k], reason,
                               tuple(outcomes)))
    return tuple(scored)
