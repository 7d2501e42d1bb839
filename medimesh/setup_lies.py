"""What a dishonest hospital sends instead of its honest setup statistics and evaluation counts.

Bench and test code only (``medimesh bench operator``, tests/test_operator_setup_reports.py):
the production hospital has no branch for any of this. :mod:`medimesh.actors.liars` wraps the
hospital actor from outside and passes every message it seals through :func:`lie`. Each lie
is pure: the honest message in, the lying one out (signed with the hospital's own key, so only
the content can give it away — what :mod:`medimesh.setup_checks` looks at).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from medimesh.protocol import EvalReport, Message, SecAggMasked, SetupStats, Update

__all__ = ["INFLATED_N", "LIES", "lie"]

INFLATED_N = 10**9  # "a billion patients"

# name -> what the hospital claims
LIES = {
    "nan_sum": "one feature's sum is NaN",
    "huge_sumsq": "one feature's sum of squares is 10^8 times its true value",
    "nan_class_counts": "one class count is NaN",
    "inflated_n": "a billion training rows, every statistic scaled to match (consistent lie)",
    "inflated_eval": "a billion test patients, all classified correctly",
}


def _first_varying(stats: SetupStats) -> int:
    """A feature with recorded values and spread at this site (where a lie shows most)."""
    c = np.maximum(np.asarray(stats.count, np.float64), 1.0)
    var = np.asarray(stats.total_sq) / c - (np.asarray(stats.total) / c) ** 2
    return int(np.argmax(var))


def _inflate(n: int) -> int:
    """The liar's training-row count: its true count times a whole factor, about 10^9."""
    return n * max(INFLATED_N // max(n, 1), 1)


def _setup(stats: SetupStats, how: str) -> SetupStats:
    if how == "nan_sum":
        total = np.array(stats.total, dtype=np.float64)
        total[_first_varying(stats)] = np.nan
        return dataclasses.replace(stats, total=total)
    if how == "huge_sumsq":
        sq = np.array(stats.total_sq, dtype=np.float64)
        sq[_first_varying(stats)] *= 1e8
        return dataclasses.replace(stats, total_sq=sq)
    if how == "nan_class_counts":
        cc = np.array(stats.class_counts, dtype=np.float64)
        cc[0] = np.nan
        return dataclasses.replace(stats, class_counts=cc)
    if how == "inflated_n":
        k = _inflate(stats.n_examples) // max(stats.n_examples, 1)
        return dataclasses.replace(
            stats, n_examples=stats.n_examples * k,
            count=np.asarray(stats.count) * k, total=np.asarray(stats.total) * k,
            total_sq=np.asarray(stats.total_sq) * k,
            class_counts=np.asarray(stats.class_counts) * k,
            finding_hist=None if stats.finding_hist is None else np.asarray(stats.finding_hist) * k,
        )
    return stats


def _eval(counts: dict[str, float]) -> dict[str, float]:
    return {**counts, "n_examples": INFLATED_N, "correct_top1": INFLATED_N,
            "correct_top3": INFLATED_N, "loss_sum": 0.0}


def lie(msg: Message, how: str) -> Any:
    """The message the dishonest hospital sends instead of ``msg`` (unchanged if ``how`` does
    not concern it)."""
    if how not in LIES:
        raise ValueError(f"unknown lie {how!r}; known: {sorted(LIES)}")
    if isinstance(msg, SetupStats):
        return _setup(msg, how)
    if how == "inflated_n" and isinstance(msg, Update):  # the weight it asks FedAvg for
        return dataclasses.replace(msg, n_examples=_inflate(msg.n_examples))
    if how != "inflated_eval":
        return msg
    if isinstance(msg, EvalReport):
        return dataclasses.replace(msg, n_examples=INFLATED_N, correct_top1=INFLATED_N,
                                   correct_top3=INFLATED_N, loss_sum=0.0)
    if isinstance(msg, Update | SecAggMasked):  # the base model's evaluation rides along
        return dataclasses.replace(msg, eval=_eval(dict(msg.eval)))
    return msg
