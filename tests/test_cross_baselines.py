"""Cross-site baselines, pure: a peer scores an isolated model; the coordinator sums counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medimesh.cross_baselines import CrossBaselines, score_isolated
from medimesh.errors import ConfigError
from medimesh.hospital import HospitalNode
from medimesh.protocol import CrossEvalReport, IsolatedModel, SetupRequest, SetupStats
from medimesh.sites import SiteDescriptor, dataset_info, load_site

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _stats(n_train: int, n_test: int, top1: float, top3: float) -> SetupStats:
    z = np.zeros(2)
    return SetupStats("spec", n_train, z, z, z, z, top1, top3, n_test)


def _report(source: str, n: int, c1: int, c3: int, spec: str = "spec") -> CrossEvalReport:
    return CrossEvalReport(spec, source, n, c1, c3)


def test_tally_sums_own_and_peer_counts_per_isolated_model() -> None:
    """Site A's model: 8/10 at home, 1/20 at B, 3/30 at C -> 12/60 on all sites' patients."""
    t = CrossBaselines((A, B, C), "spec", enabled=True)
    t.add_own(A, _stats(50, 10, 0.8, 0.9))
    t.add_own(B, _stats(40, 20, 0.5, 0.75))
    t.add_own(C, _stats(0, 30, math.nan, math.nan))  # no training rows: no isolated model
    assert t.expected([A, B, C]) == {(A, B), (A, C), (B, A), (B, C)}
    assert t.add_report(B, _report(A, 20, 1, 4))
    assert t.add_report(C, _report(A, 30, 3, 9))
    assert not t.complete([A, B, C])
    assert t.add_report(A, _report(B, 10, 5, 6)) and t.add_report(C, _report(B, 30, 6, 12))
    assert t.complete([A, B, C])
    # refused: a repeat, a self-report, a stranger, another data model, impossible counts
    assert not t.add_report(B, _report(A, 20, 20, 20))
    assert not t.add_report(A, _report(A, 10, 10, 10))
    assert not t.add_report("d" * 64, _report(A, 10, 1, 1))
    assert not t.add_report(C, _report(A, 5, 1, 1, spec="other"))
    assert not t.add_report(A, _report(C, 5, 4, 3))
    assert t.refused == 5
    out = t.summary({A: "site-a", B: "site-b", C: "site-c"})
    assert out["site-a"] == {
        "own_site_top1": 0.8, "own_site_top3": 0.9, "own_site_n": 10,
        "all_sites_top1": 12 / 60, "all_sites_top3": 22 / 60, "all_sites_n": 60,
        "all_sites_evaluated_by": 3,
    }
    assert out["site-b"]["all_sites_top1"] == (10 + 5 + 6) / 60
    assert out["site-c"]["own_site_top1"] is None and out["site-c"]["all_sites_top1"] is None


def test_tally_when_off_reports_own_site_only() -> None:
    """With cross baselines off nothing is expected, every report is refused."""
    t = CrossBaselines((A, B), "spec", enabled=False)
    t.add_own(A, _stats(50, 10, 0.8, 0.9))
    assert t.expected([A, B]) == set() and t.complete([A, B])
    assert not t.add_report(B, _report(A, 20, 1, 4))
    row = t.summary({A: "site-a"})["site-a"]
    assert row["own_site_top1"] == 0.8 and row["all_sites_top1"] is None


def _node(site: int) -> HospitalNode:
    d = SiteDescriptor("rare", f"h{site}", {"cohort": {"n_hospitals": 3, "seed": 4}, "site": site})
    return HospitalNode(load_site(d), dataset_info("rare", d.params))


def test_a_peer_scores_an_isolated_model_on_its_own_test_rows() -> None:
    """The model a hospital would send is scored by a peer exactly as scoring it directly."""
    owner, peer = _node(0), _node(1)
    info = dataset_info("rare", {})
    k, f = len(info.class_names), len(info.feature_names)
    owner.on_setup_request(SetupRequest("spec", f, k, True))
    peer.on_setup_request(SetupRequest("spec", f, k, True))
    msg = owner.isolated_model()
    assert msg is not None and msg.weights.shape == (f, k) and msg.mean.shape == (f,)
    report = peer.on_isolated_model(A, msg)
    assert (report.source, report.n_examples) == (A, peer.n_test) and report.n_examples > 0
    assert 0 <= report.correct_top1 <= report.correct_top3 <= report.n_examples
    # The same model, scored on the owner's own rows, gives its own-site baseline.
    own = owner.on_isolated_model(B, msg)
    top1, _ = owner.isolated_baseline()
    assert own.correct_top1 == round(top1 * owner.n_test)
    with pytest.raises(ConfigError):  # another data model
        peer.on_isolated_model(A, IsolatedModel("other", msg.weights, msg.bias, msg.mean,
                                                msg.std))


def test_malformed_isolated_models_are_refused_not_scored() -> None:
    """Wrong shapes, NaN or a zero scale: ConfigError, never a score."""
    x, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
    good = IsolatedModel("s", np.zeros((3, 2), np.float32), np.zeros(2, np.float32),
                         np.zeros(3), np.ones(3))
    assert score_isolated(good, x, y, 2) == (4, 2, 4)
    assert score_isolated(good, x[:0], y[:0], 2) == (0, 0, 0)
    bad = [
        IsolatedModel("s", np.zeros((2, 2), np.float32), good.bias, good.mean, good.std),
        IsolatedModel("s", good.weights, np.zeros(3, np.float32), good.mean, good.std),
        IsolatedModel("s", good.weights, good.bias, np.zeros(2), good.std),
        IsolatedModel("s", good.weights, good.bias, good.mean, np.zeros(3)),
        IsolatedModel("s", np.full((3, 2), np.nan, np.float32), good.bias, good.mean, good.std),
    ]
    for m in bad:
        with pytest.raises(ConfigError):
            score_isolated(m, x, y, 2)
