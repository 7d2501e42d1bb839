"""What a hospital tells the coordinator about its data, checked before it counts.

A hospital's setup statistics (per-feature count, sum, sum of squares, class counts, committed
training and test sizes) and its evaluation counts are aggregates of rows nobody else can see:
they cannot be recomputed, only checked for what they must satisfy if they came from real rows.
A dishonest hospital that sends a NaN sum, a huge sum of squares, NaN class counts, an
inflated committed size or inflated evaluation counts is refused here, with the check, the
value and the bound named, before its numbers reach the consortium's standardization, the
FedAvg / DP / secure-aggregation weights or the published accuracy (docs/threat-model/
setup_reports.md states the rules and what they still let through).

Pure functions over decoded messages; the coordinator audits each refusal.

The rules, and why they cannot drop an honest site:

* **Per site, exact** (true for any real rows): arrays of the consortium's shapes; every value
  finite; ``n_examples`` and ``n_test`` whole and ≥ 0; class counts whole, ≥ 0 and adding up
  to ``n_examples``; each feature's count of recorded values whole and in ``[0, n_examples]``;
  a feature with no recorded value has zero sums; sums of squares ≥ 0 and, by Cauchy–Schwarz,
  ``sum² ≤ count · sum_of_squares`` (so the site's own variance is ≥ 0); isolated-model scores
  NaN or in [0, 1]. A relative tolerance of 1e-9 covers floating-point rounding.
* **Site size, relative** (:data:`SIZE_RATIO`): a site's rows (training + test) may be at most
  100× the median over the sites that passed the exact checks. The median cannot be moved by
  one liar when at least three sites answer; an honest site 100× larger than the typical one
  would be refused, a site with 5 patients never is (there is no lower bound). With two sites
  the median is half the liar's number: the rule protects nothing there, which is said, not
  hidden. An optional consortium cap (``max_site_examples``) applies in addition.
* **Spread, relative to the others** (:data:`SPREAD_FACTOR`): no feature's consortium standard
  deviation may change by more than 10× (up or down) when the site is added to the others
  (leave-one-out). A huge sum of squares or a far-off sum makes the pooled deviation explode
  and is refused; an honest small site barely moves it (a site with w of the rows and v times
  the others' variance moves it by about sqrt(1 + w·v)), so only a site with both many rows
  and a wildly different scale (a unit error, e.g. g vs mg) trips it. Features that do not vary
  at the other sites are skipped: a rare-disease site may be the only one where they vary;
  so are 0/1 indicators (Σx² = Σx ≤ count at this site and at the others), whose spread the
  data type bounds: a symptom seen at one specialist centre and almost nowhere else is the
  product. A site more than ~20 standard deviations off the others on a feature, with a fifth
  of the rows, is refused too: such features should be log-transformed in the spec.
* **Evaluation counts**: whole, finite, ``0 ≤ correct_top1 ≤ correct_top3 ≤ n ≤`` the site's
  committed test size, and ``0 ≤ loss_sum ≤ n · LOSS_PER_EXAMPLE_MAX`` (the model clips
  probabilities at 1e-12, medimesh.model.cross_entropy).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medimesh.protocol import EvalReport, SetupStats

__all__ = [
    "LOSS_PER_EXAMPLE_MAX",
    "SIZE_RATIO",
    "SPREAD_FACTOR",
    "Refusal",
    "SetupScreen",
    "check_eval_counts",
    "check_eval_report",
    "check_setup_stats",
    "check_sizes",
    "check_spread",
    "screen_setup",
]

SIZE_RATIO = 100.0  # a site may hold at most this many times the median site's rows
SPREAD_FACTOR = 10.0  # ...and move no feature's consortium std by more than this factor
LOSS_PER_EXAMPLE_MAX = -math.log(1e-12)  # medimesh.model.cross_entropy clips p at 1e-12
_REL = 1e-9  # floating-point slack of the exact checks
_FLAT = 1e-8  # a std below this counts as "does not vary" (as in features.combine_stats)


@dataclass(frozen=True, slots=True)
class Refusal:
    """One failed check: its name, the offending value, the bound it broke, and where."""

    check: str
    value: float
    bound: float
    where: str = ""  # e.g. "feature 3", "class 0"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (the audit trail is JSON): non-finite numbers become their repr."""
        return {"check": self.check, "value": _json_number(self.value),
                "bound": _json_number(self.bound), "where": self.where}


def _json_number(x: float) -> float | str:
    return float(x) if math.isfinite(x) else repr(float(x))


def _whole(x: float) -> bool:
    return math.isfinite(x) and x == math.floor(x)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_setup_stats(stats: SetupStats, n_features: int, n_classes: int) -> Refusal | None:
    """The exact checks on one site's setup statistics (see the module docstring)."""
    arrays = {"count": (stats.count, n_features), "total": (stats.total, n_features),
              "total_sq": (stats.total_sq, n_features),
              "class_counts": (stats.class_counts, n_classes)}
    for name, (a, want) in arrays.items():
        arr = np.asarray(a)
        if arr.shape != (want,):
            return Refusal(f"{name}_shape", float(arr.size), float(want))
    for name, (a, _) in arrays.items():
        arr = np.asarray(a, dtype=np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            i = _first(bad)
            return Refusal(f"{name}_finite", float(arr[i]), math.inf, f"index {i}")
    for name in ("n_examples", "n_test"):
        v = float(getattr(stats, name))
        if not _whole(v) or v < 0:
            return Refusal(f"{name}_whole", v, 0.0)
    n = float(stats.n_examples)
    cc = np.asarray(stats.class_counts, dtype=np.float64)
    bad = (cc < 0) | (cc != np.floor(cc))
    if bad.any():
        i = _first(bad)
        return Refusal("class_counts_whole", float(cc[i]), 0.0, f"class {i}")
    if float(cc.sum()) != n:
        return Refusal("class_counts_sum", float(cc.sum()), n)
    count = np.asarray(stats.count, dtype=np.float64)
    total = np.asarray(stats.total, dtype=np.float64)
    sq = np.asarray(stats.total_sq, dtype=np.float64)
    bad = (count < 0) | (count > n) | (count != np.floor(count))
    if bad.any():
        i = _first(bad)
        return Refusal("feature_count_range", float(count[i]), n, f"feature {i}")
    bad = (count == 0) & ((total != 0) | (sq != 0))
    if bad.any():
        i = _first(bad)
        return Refusal("empty_feature_sums", float(abs(total[i]) + sq[i]), 0.0, f"feature {i}")
    if (sq < 0).any():
        i = _first(sq < 0)
        return Refusal("sum_of_squares_negative", float(sq[i]), 0.0, f"feature {i}")
    with np.errstate(over="ignore", invalid="ignore"):
        lhs = total**2
        rhs = count * sq
        bad = lhs > rhs * (1 + _REL) + _REL
    if bad.any():  # Cauchy–Schwarz: (Σx)² ≤ count · Σx²
        i = _first(bad)
        return Refusal("cauchy_schwarz", float(lhs[i]), float(rhs[i]), f"feature {i}")
    for name in ("isolated_top1", "isolated_top3"):
        v = float(getattr(stats, name))
        if not math.isnan(v) and not 0.0 <= v <= 1.0:
            return Refusal(f"{name}_range", v, 1.0)
    return None


def check_sizes(
    sizes: Mapping[str, int], ratio: float = SIZE_RATIO, cap: int | None = None
) -> dict[str, Refusal]:
    """Sites whose row count exceeds ``ratio`` × the median (or the consortium's ``cap``)."""
    if not sizes:
        return {}
    bound = ratio * max(float(statistics.median(sizes.values())), 1.0)
    out: dict[str, Refusal] = {}
    for site, n in sizes.items():
        if cap is not None and n > cap:
            out[site] = Refusal("site_size_cap", float(n), float(cap))
        elif n > bound:
            out[site] = Refusal("site_size_vs_median", float(n), bound)
    return out


def _std(count: np.ndarray, total: np.ndarray, sq: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        safe = np.maximum(count, 1.0)
        mean = total / safe
        return np.asarray(np.sqrt(np.maximum(sq / safe - mean**2, 0.0)))


def check_spread(
    parts: Mapping[str, SetupStats], factor: float = SPREAD_FACTOR
) -> dict[str, Refusal]:
    """Sites whose statistics move a feature's consortium std by more than ``factor``.

    Leave-one-out: each site against the pooled statistics of all the others; features with
    fewer than two recorded values or no spread elsewhere are not judged.
    """
    if len(parts) < 2:
        return {}
    arr = {s: (np.asarray(p.count, np.float64), np.asarray(p.total, np.float64),
               np.asarray(p.total_sq, np.float64)) for s, p in parts.items()}
    all_c, all_t, all_q = (np.sum([a[k] for a in arr.values()], axis=0) for k in range(3))
    pooled = _std(all_c, all_t, all_q)
    out: dict[str, Refusal] = {}
    for site, (c, t, q) in arr.items():
        rest_c = all_c - c
        rest_t, rest_q = all_t - t, all_q - q
        rest = _std(rest_c, rest_t, rest_q)
        # 0/1 indicators here and everywhere else (x² = x, so Σx² = Σx ≤ count): the site's
        # spread is bounded by the data type itself; a rare symptom seen mostly at one site is
        # the product, not an attack.
        binary = (np.abs(q - t) <= _REL * np.maximum(np.abs(q), 1.0)) & (t >= 0) & (t <= c) & (
            np.abs(rest_q - rest_t) <= _REL * np.maximum(np.abs(rest_q), 1.0)
        )
        judged = (rest_c >= 2) & (rest >= _FLAT) & ~binary
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.where(judged, pooled / np.where(judged, rest, 1.0), 1.0)
        ratio = np.where(np.isfinite(ratio), ratio, np.inf)
        worst = np.maximum(ratio, 1.0 / np.maximum(ratio, 1e-300))
        j = int(np.argmax(worst))
        if worst[j] > factor:
            out[site] = Refusal("spread_vs_others", float(ratio[j]), factor, f"feature {j}")
    return out


@dataclass(frozen=True, slots=True)
class SetupScreen:
    """Which sites' setup statistics count (in roster order), and why the others do not."""

    accepted: tuple[str, ...]
    refused: dict[str, Refusal] = field(default_factory=dict)


def screen_setup(
    stats: Mapping[str, SetupStats],
    order: Sequence[str],
    n_features: int,
    n_classes: int,
    max_site_examples: int | None = None,
) -> SetupScreen:
    """Exact checks per site, then the size rule, then the spread rule, on the survivors."""
    refused: dict[str, Refusal] = {}
    present = [s for s in order if s in stats]
    for site in present:
        bad = check_setup_stats(stats[site], n_features, n_classes)
        if bad is not None:
            refused[site] = bad
    ok = [s for s in present if s not in refused]
    refused |= check_sizes(
        {s: int(stats[s].n_examples) + int(stats[s].n_test) for s in ok},
        cap=max_site_examples,
    )
    ok = [s for s in ok if s not in refused]
    refused |= check_spread({s: stats[s] for s in ok})
    return SetupScreen(tuple(s for s in ok if s not in refused), refused)


def check_eval_counts(
    n: float, top1: float, top3: float, loss_sum: float, test_size: int | None
) -> Refusal | None:
    """One site's evaluation counts against each other and its committed test size
    (None: no committed size known, e.g. a checkpoint from before these checks)."""
    for name, v in (("n_examples", n), ("correct_top1", top1), ("correct_top3", top3)):
        if not _whole(float(v)) or v < 0:
            return Refusal(f"eval_{name}_whole", float(v), 0.0)
    if test_size is not None and n > test_size:
        return Refusal("eval_n_exceeds_committed_test", float(n), float(test_size))
    if top3 > n:
        return Refusal("eval_top3_exceeds_n", float(top3), float(n))
    if top1 > top3:
        return Refusal("eval_top1_exceeds_top3", float(top1), float(top3))
    limit = float(n) * LOSS_PER_EXAMPLE_MAX * (1 + 1e-6) + 1e-6
    if not math.isfinite(float(loss_sum)) or not 0.0 <= loss_sum <= limit:
        return Refusal("eval_loss_range", float(loss_sum), limit)
    return None


def check_eval_report(report: EvalReport, test_size: int | None) -> Refusal | None:
    """:func:`check_eval_counts` on a decoded report."""
    return check_eval_counts(
        report.n_examples, report.correct_top1, report.correct_top3, report.loss_sum, test_size
    )
