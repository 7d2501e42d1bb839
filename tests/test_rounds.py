"""Round bookkeeping: completion, quorum, late messages, server momentum."""

from __future__ import annotations

import numpy as np
import pytest

from medimesh.errors import ConfigError, QuorumNotReached
from medimesh.model import init_model
from medimesh.protocol import Update, Verdict
from medimesh.rounds import EvalTally, RoundState, ServerOptimizer, close_round


def _upd(value: float, n: int) -> Update:
    return Update(
        1,
        "b" * 64,
        n,
        np.full((2, 2), value, np.float32),
        np.zeros(2, np.float32),
        {"n_examples": 10, "correct_top1": 7, "correct_top3": 10, "loss_sum": 3.0},
    )


def _state(min_updates: int = 1) -> RoundState:
    return RoundState(1, init_model(2, 2), "b" * 64, frozenset({"h1", "h2"}), 0.0, min_updates)


def test_round_completes_when_every_hospital_is_answered() -> None:
    """Complete needs a verdict per hospital and, if accepted, the update itself."""
    s = _state()
    s.add_verdict(Verdict(1, "d1", "h1", True, (), {}), "v")
    s.add_verdict(Verdict(1, "d2", "h2", False, ("replay",), {}), "v")
    assert not s.complete()  # h1 accepted but its update has not arrived
    s.add_update("d1", "h1", _upd(1.0, 10))
    assert s.complete()
    assert [d for d, *_ in s.accepted()] == ["d1"]
    assert s.rejection_reasons() == {"replay": 1}


def test_close_aggregates_and_enforces_quorum() -> None:
    """Accepted deltas are averaged by example count; too few accepted is an error."""
    s = _state()
    for dig, h, v, n in (("d1", "h1", 1.0, 30), ("d2", "h2", -1.0, 10)):
        s.add_update(dig, h, _upd(v, n))
        s.add_verdict(Verdict(1, dig, h, True, (), {}), "v" + dig)
    model, _, ups, verdicts = close_round(s)
    assert np.allclose(model.weights, 0.5) and ups == ["d1", "d2"] and verdicts == ["vd1", "vd2"]
    assert not s.add_update("late", "h1", _upd(1.0, 1)) and s.late == ["late"]
    with pytest.raises(QuorumNotReached):
        close_round(_state(min_updates=1))


def test_update_from_someone_else_is_not_aggregated() -> None:
    """A verdict about h1's digest does not let h2's bytes into the aggregate."""
    s = _state()
    s.add_update("d1", "h2", _upd(9.0, 10))
    s.add_verdict(Verdict(1, "d1", "h1", True, (), {}), "v")
    assert s.accepted() == []


def test_a_hospital_counts_once_even_with_two_accepted_updates() -> None:
    """A retried round may hold h1's late update from the failed attempt beside its new one:
    the aggregate takes one (the lowest digest), never both."""
    s = _state()
    for dig, h, v in (("d2-new", "h1", 3.0), ("d1-old", "h1", 1.0), ("d3", "h2", -1.0)):
        s.add_update(dig, h, _upd(v, 10))
        s.add_verdict(Verdict(1, dig, h, True, (), {}), "v" + dig)
    assert [(d, h) for d, h, *_ in s.accepted()] == [("d1-old", "h1"), ("d3", "h2")]
    model, _, ups, _ = close_round(s)
    assert ups == ["d1-old", "d3"] and np.allclose(model.weights, 0.0)


def test_server_momentum_accumulates_direction() -> None:
    """With momentum, a repeated aggregate moves the model further each round."""
    opt = ServerOptimizer(lr=1.0, momentum=0.5)
    base = init_model(2, 2)
    agg = np.ones(6)
    m1, v1 = opt.step(base, agg, None)
    m2, _ = opt.step(m1, agg, v1)
    assert np.allclose(m1.weights, 1.0) and np.allclose(m2.weights, 2.5)
    with pytest.raises(ConfigError):
        ServerOptimizer(momentum=1.0)


def test_eval_tally_sums_counts_over_sites() -> None:
    """Accuracy over the union of test splits is total correct over total rows."""
    t = EvalTally("b" * 64, frozenset({"h1", "h2"}))
    t.add_from_update("h1", _upd(0.0, 1))
    assert not t.complete()
    t.add_from_update("h2", _upd(0.0, 1))
    assert t.complete() and t.summary()["top1"] == pytest.approx(0.7)
