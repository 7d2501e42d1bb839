"""Cross-site baselines: each hospital's isolated model scored on every site's test patients.

Why: a hospital's isolated model scored on its own (narrow) test split looks better than the
federated model scored on everyone's, so the comparison reads as "federation loses". What a
hospital actually compares is its own model against the consortium's on the same patients:
``medimesh bench accuracy`` scores isolated models on all sites' test splits. This module does
that in the live system without moving a row:

1. at setup, a hospital trains its isolated model and seals it (weights + its own
   standardization) to each peer hospital through the router (:class:`IsolatedModel`);
2. each peer scores it on its own test patients and sends only counts, signed, to the
   coordinator (:class:`CrossEvalReport`);
3. the coordinator adds those counts to the owner's own-site counts (:class:`CrossBaselines`):
   "isolated model of site i on all sites' test patients" — the same pooled test patients the
   federated model's per-round accuracy is computed on (:class:`medimesh.rounds.EvalTally`).

It reveals each isolated model to the peer hospitals (never to the coordinator or router), so
it is a consortium option, and off under differential privacy or secure aggregation
(docs/privacy.md). Pure: decoded messages in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medimesh.errors import ConfigError
from medimesh.model import Model, predict_proba, topk_correct
from medimesh.protocol import CrossEvalReport, IsolatedModel, SetupStats

__all__ = ["Counts", "CrossBaselines", "score_isolated"]


@dataclass(frozen=True, slots=True)
class Counts:
    """Test patients scored and how many had the true class first / in the top three."""

    n: int = 0
    top1: int = 0
    top3: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.n + other.n, self.top1 + other.top1, self.top3 + other.top3)

    def rate(self, which: str) -> float | None:
        """top-k accuracy, or None (not NaN: this goes into strict JSON) with no patients."""
        return None if self.n == 0 else (self.top1 if which == "top1" else self.top3) / self.n


def score_isolated(
    msg: IsolatedModel, x_test_log: np.ndarray, y_test: np.ndarray, n_classes: int
) -> tuple[int, int, int]:
    """(n, top-1 correct, top-3 correct) of a peer's isolated model on this site's test rows.

    ``x_test_log`` are the site's rows after the shared log transform, before scaling: the
    peer's own standardization is applied here. Every shape and value is checked first, so a
    malformed model raises ConfigError instead of scoring garbage.
    """
    n_features = x_test_log.shape[1]
    w, b = np.asarray(msg.weights), np.asarray(msg.bias)
    mean, std = np.asarray(msg.mean, dtype=np.float64), np.asarray(msg.std, dtype=np.float64)
    if w.shape != (n_features, n_classes) or b.shape != (n_classes,):
        raise ConfigError(f"isolated model has shape {w.shape}, expected {(n_features, n_classes)}")
    if mean.shape != (n_features,) or std.shape != (n_features,):
        raise ConfigError("isolated model's standardization does not match the features")
    finite = all(np.isfinite(a).all() for a in (w, b, mean, std))
    if not finite or (std <= 0).any():
        raise ConfigError("isolated model has non-finite values or a non-positive scale")
    n = len(y_test)
    if n == 0:
        return 0, 0, 0
    z = (x_test_log - mean) / std
    x = np.where(np.isnan(z), 0.0, z).astype(np.float32)
    proba = predict_proba(Model(w.astype(np.float32), b.astype(np.float32)), x)
    return n, topk_correct(proba, y_test, 1), topk_correct(proba, y_test, 3)


@dataclass(slots=True)
class CrossBaselines:
    """The coordinator's tally (sans-IO): own-site counts from each hospital's setup
    statistics plus its peers' counts, summed per isolated model.

    ``hospitals`` are the roster's hospital peer ids in roster order; ``enabled`` says whether
    the consortium asked for cross-site scores at all (else only own-site numbers exist).
    """

    hospitals: tuple[str, ...]
    spec_hash: str
    enabled: bool
    own: dict[str, Counts] = field(default_factory=dict)
    trained: set[str] = field(default_factory=set)  # sites with an isolated model to send
    cross: dict[tuple[str, str], Counts] = field(default_factory=dict)  # (source, evaluator)
    refused: int = 0

    def add_own(self, source: str, stats: SetupStats) -> None:
        """A hospital's setup statistics: its isolated model's score on its own test split."""
        if source not in self.hospitals:
            return
        n = int(stats.n_test)
        if stats.n_examples > 0:
            self.trained.add(source)
        if n <= 0 or math.isnan(stats.isolated_top1) or math.isnan(stats.isolated_top3):
            self.own[source] = Counts()
            return
        self.own[source] = Counts(
            n, round(stats.isolated_top1 * n), round(stats.isolated_top3 * n)
        )

    def add_report(self, evaluator: str, report: CrossEvalReport) -> bool:
        """A peer's counts for one isolated model; the first valid report per pair counts.

        Refused (False): cross baselines off, an unknown or self-reported pair, another data
        model, or counts that cannot be (top-1 > top-3 > n).
        """
        pair = (report.source, evaluator)
        ok = (
            self.enabled
            and evaluator in self.hospitals
            and report.source in self.hospitals
            and report.source != evaluator
            and report.spec_hash == self.spec_hash
            and 0 <= report.correct_top1 <= report.correct_top3 <= report.n_examples
            and pair not in self.cross
        )
        if not ok:
            self.refused += 1
            return False
        self.cross[pair] = Counts(report.n_examples, report.correct_top1, report.correct_top3)
        return True

    def expected(self, answered: Sequence[str]) -> set[tuple[str, str]]:
        """The (source, evaluator) pairs to wait for among the hospitals that answered setup."""
        if not self.enabled:
            return set()
        live = [h for h in self.hospitals if h in answered]
        return {(s, e) for s in live if s in self.trained for e in live if e != s}

    def complete(self, answered: Sequence[str]) -> bool:
        return self.expected(answered) <= set(self.cross)

    def summary(self, names: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Per site name: own-site and all-sites scores of its isolated model, clearly named.

        ``all_sites_*`` is None when cross baselines are off; ``all_sites_evaluated_by`` says
        how many sites' test patients it covers (fewer than the hospitals if a report is
        missing), so a partial number is never mistaken for the full one.
        """
        out: dict[str, dict[str, Any]] = {}
        for source in self.hospitals:
            if source not in self.own:
                continue
            own = self.own[source]
            row: dict[str, Any] = {
                "own_site_top1": own.rate("top1"),
                "own_site_top3": own.rate("top3"),
                "own_site_n": own.n,
                "all_sites_top1": None,
                "all_sites_top3": None,
                "all_sites_n": None,
                "all_sites_evaluated_by": None,
            }
            if self.enabled and source in self.trained:
                peers = [c for (s, _), c in self.cross.items() if s == source]
                total = sum(peers, own)
                row |= {
                    "all_sites_top1": total.rate("top1"),
                    "all_sites_top3": total.rate("top3"),
                    "all_sites_n": total.n,
                    "all_sites_evaluated_by": len(peers) + (1 if own.n else 0),
                }
            out[names.get(source, source)] = row
        return out
