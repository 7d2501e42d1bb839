"""Cross-update scores (medimesh.scoring) and the validator's policy (medimesh.reputation)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medimesh.aggregation import CLEAN_CLIP_MULTIPLE, fedavg, rule_for_round, trimmed_mean
from medimesh.errors import ConfigError
from medimesh.reputation import Policy, Reputation, Standing, judge_round
from medimesh.scoring import Flag, Thresholds, score_round

E = np.eye(8)


def _agreeing(n: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """n sites sharing direction e0, each with its own side component (non-IID)."""
    return {f"h{i}": scale * (E[0] + 0.5 * E[1 + i % 6]) for i in range(n)}


# ---------------------------------------------------------------- norm


def test_norm_outlier_needs_six_times_the_others_or_a_jump_over_its_own_history() -> None:
    """x9 is flagged with its score and threshold; x4 only when it is also a jump over the
    hospital's own history; a site that always sends x5 is compared with itself."""
    ups = _agreeing(4)
    ups["x"] = 9.0 * ups["h0"]
    s = score_round(ups)["x"]
    base = float(np.linalg.norm(ups["h0"]))
    assert s.norm_ratio == pytest.approx(9.0)
    assert s.flags == (Flag("norm_outlier", pytest.approx(9.0), 8.0),)  # type: ignore[arg-type]
    ups["x"] = 4.0 * ups["h0"]
    assert score_round(ups)["x"].flags == ()
    jumped = score_round(ups, history={"x": [base, base]})["x"]
    assert jumped.self_ratio == pytest.approx(4.0)
    assert [(f.reason, f.threshold) for f in jumped.flags] == [("norm_outlier", 3.0)]
    ups["x"] = 5.0 * ups["h0"]
    steady = score_round(ups, history={"x": [5 * base, 5 * base, 4.5 * base]})["x"]
    assert steady.flags == () and steady.self_ratio == pytest.approx(1.0)


# ---------------------------------------------------------------- direction


def test_opposes_others_flags_one_site_against_three_that_agree() -> None:
    """Hand case: the others' unit vectors agree (consensus 0.8), the suspect points away."""
    ups = _agreeing(3)
    ups["x"] = -(E[0] + 0.6 * E[7])
    res = score_round(ups)
    # Reference: coordinate median of the three unit vectors (1, 0.5 on distinct axes)/sqrt(1.25)
    # = e0 / sqrt(1.25): cosine of x = -1 / sqrt(1.36).
    assert res["x"].loo_cosine == pytest.approx(-1 / np.sqrt(1.36))
    assert res["x"].loo_consensus == pytest.approx(1 / 1.25)
    assert res["x"].reasons == ("opposes_others",)
    assert all(res[h].flags == () for h in ("h0", "h1", "h2"))


def test_direction_is_not_judged_without_a_consensus_or_with_few_others() -> None:
    """Late-training updates that cancel out close the gate; fewer than 3 others: no test."""
    ups = {"a": E[0] + 0.3 * E[4], "b": E[1] + 0.3 * E[4], "c": -E[4] - 0.2 * E[2],
           "d": E[3] + 0.3 * E[4]}
    res = score_round(ups)  # the others' pairwise cosines are 0.09 / 1.09: no consensus
    assert res["c"].loo_cosine < -0.3 and res["c"].loo_consensus < 0.2
    assert all(s.flags == () for s in res.values())
    three = score_round({k: ups[k] for k in "abc"})
    assert all(np.isnan(s.loo_cosine) and np.isnan(s.norm_ratio) for s in three.values())


def test_a_crafted_large_update_cannot_frame_an_honest_site() -> None:
    """The issue's attack: a norm-40 update along -victim bends a raw leave-one-out mean
    against the victim. A median of unit vectors ignores its size and its one vote."""
    ups = _agreeing(4)
    victim = ups["h0"]
    ups["x"] = -40.0 * victim / np.linalg.norm(victim)
    res = score_round(ups)
    assert res["h0"].flags == ()
    assert res["h0"].loo_cosine > 0.5
    assert "opposes_others" in res["x"].reasons
    # The same frame against a raw mean would have worked: mean of others points away.
    raw = np.mean([ups[k] for k in ("h1", "h2", "h3", "x")], axis=0)
    assert float(victim @ raw) < 0


def test_suspects_are_scored_but_never_shape_a_reference() -> None:
    """A quarantined sender's update is judged, but kept out of the others' medians."""
    ups = _agreeing(4)
    ups["q"] = -(E[0] + E[7])
    ups["r"] = -(E[0] + E[6])
    with_q = score_round(ups, suspects={"q"})
    assert "opposes_others" in with_q["q"].reasons
    assert with_q["h0"].loo_consensus == score_round(
        {k: v for k, v in ups.items() if k != "q"}
    )["h0"].loo_consensus


# ---------------------------------------------------------------- free riders, duplicates


def test_free_riders_zero_and_replayed_step() -> None:
    ups = _agreeing(4)
    prev = np.mean(list(ups.values()), axis=0)
    ups["z"] = np.zeros(8)
    ups["p"] = prev.copy()
    res = score_round(ups, previous=prev)
    assert res["z"].reasons == ("free_rider",) and res["p"].reasons == ("free_rider",)
    assert res["z"].flags[0].threshold == 0.05
    assert all(res[f"h{i}"].flags == () for i in range(4))


def test_a_duplicate_pair_flags_only_the_later_sender() -> None:
    """Copying an honest update never gets its author flagged (framing)."""
    ups = _agreeing(4)
    ups["copy"] = ups["h2"].copy()
    first = ["h0", "h1", "h2", "h3", "copy"]
    res = score_round(ups, arrival=first)
    assert res["copy"].reasons == ("near_duplicate",) and res["h2"].flags == ()
    swapped = ["h0", "h1", "copy", "h3", "h2"]
    res = score_round(ups, arrival=swapped)
    assert res["h2"].reasons == ("near_duplicate",) and res["copy"].flags == ()


def test_scoring_refuses_inconsistent_input() -> None:
    with pytest.raises(ConfigError):
        score_round({"a": np.ones(2), "b": np.ones(3)})
    with pytest.raises(ConfigError):
        score_round({"a": np.array([np.nan, 1.0])})
    with pytest.raises(ConfigError):
        score_round({"a": np.ones(2)}, arrival=["b"])
    with pytest.raises(ConfigError):
        Thresholds(norm_ratio=2.0, jump_ratio=3.0)
    assert score_round({}) == {}


# ---------------------------------------------------------------- policy


def _frame_round(n: int = 5) -> dict[str, np.ndarray]:
    ups = _agreeing(n)
    ups["flip"] = -(E[0] + 0.6 * E[7])
    ups["big"] = 9.0 * ups["h1"]
    return ups


def test_f0_audits_flags_but_excludes_nobody() -> None:
    """Declared f = 0: evidence is recorded, no hospital is excluded or quarantined."""
    state, pol = Reputation(), Policy(tolerate=0)
    for r in range(1, 5):
        out = judge_round(state, pol, r, _frame_round())
        state = out.state
        assert not any(j.excluded for j in out.judgements.values())
        assert out.judgements["flip"].flags and out.judgements["big"].flags
        assert "opposes_others.threshold" in out.judgements["flip"].audit_scores()
        assert out.events == []
    assert state.get("flip").strikes == 4.0 and not state.get("flip").quarantined


def test_f1_excludes_only_the_most_severe_suspect() -> None:
    """Two flagged, f = 1: the one further past its threshold is excluded, the other is
    accepted with its flag audited."""
    out = judge_round(Reputation(), Policy(tolerate=1), 1, _frame_round())
    excluded = [h for h, j in out.judgements.items() if j.excluded]
    assert len(excluded) == 1
    other = ({"flip", "big"} - set(excluded)).pop()
    assert out.judgements[other].flags and not out.judgements[other].excluded
    assert out.judgements[excluded[0]].severity >= out.judgements[other].severity


def test_budget_never_reaches_half_the_round() -> None:
    """f = 5 declared, 4 updates: at most (4 - 1) // 2 = 1 excluded."""
    ups = {"a": E[0], "b": E[0] + 0.1 * E[1], "c": -E[0], "d": 9 * E[0]}
    out = judge_round(Reputation(), Policy(tolerate=5), 1, ups)
    assert sum(j.excluded for j in out.judgements.values()) <= 1


def test_strikes_decay_quarantine_needs_repeats_and_probation_ends() -> None:
    """flag, clean, flag: no quarantine (strikes decay). Two flags in a row: quarantine,
    excluded on probation with clean rounds / rounds needed, re-admitted after three clean."""
    pol = Policy(tolerate=1)
    clean = _agreeing(5)
    bad = {**clean, "h4": -(E[0] + 0.6 * E[7])}
    state = Reputation()
    for r, ups in enumerate((bad, clean, bad), start=1):
        out = judge_round(state, pol, r, ups)
        state = out.state
    assert state.get("h4").strikes == pytest.approx(1.5) and not state.get("h4").quarantined
    out = judge_round(state, pol, 4, bad)
    state = out.state
    assert state.get("h4").quarantined
    assert [e[0] for e in out.events] == ["hospital_quarantined"]
    assert out.events[0][2]["threshold"] == 2.0
    for r in (5, 6):
        out = judge_round(state, pol, r, clean)
        state = out.state
        j = out.judgements["h4"]
        assert j.excluded and j.reasons == ("quarantined",)
        assert j.audit_scores()["quarantined.threshold"] == 3.0
    out = judge_round(state, pol, 7, clean)
    assert [e[0] for e in out.events] == ["hospital_readmitted"]
    assert not out.state.get("h4").quarantined
    assert not judge_round(out.state, pol, 8, clean).judgements["h4"].excluded


def test_an_established_site_is_not_the_copy_even_if_the_copy_arrives_first() -> None:
    """A newcomer that predicts and races an established hospital's update is the one
    flagged: precedence goes to long clean records, then to arrival."""
    ups = _agreeing(4)
    ups["new"] = ups["h1"].copy()
    state = Reputation(3, {f"h{i}": Standing(clean_streak=3) for i in range(4)})
    out = judge_round(state, Policy(tolerate=1), 4, ups, arrival=["new", "h0", "h1", "h2", "h3"])
    assert out.judgements["new"].excluded and out.judgements["new"].reasons == ("near_duplicate",)
    assert not out.judgements["h1"].flags


def test_state_round_trips_and_refuses_garbage() -> None:
    out = judge_round(Reputation(), Policy(tolerate=1), 1, _frame_round())
    again = Reputation.from_dict(out.state.to_dict())
    assert again == out.state
    with pytest.raises(ConfigError):
        Reputation.from_dict({"round": 1, "standings": {"a": {"strikes": "x"}}})


# ---------------------------------------------------------------- properties


@settings(deadline=None, max_examples=60)
@given(st.lists(st.lists(st.floats(-50, 50), min_size=6, max_size=6), min_size=1, max_size=9))
def test_f0_never_excludes_anyone(rows: list[list[float]]) -> None:
    """Whatever protocol-clean updates arrive, declared f = 0 excludes no one."""
    ups = {f"h{i}": np.array(r) for i, r in enumerate(rows)}
    out = judge_round(Reputation(), Policy(tolerate=0), 1, ups)
    assert not any(j.excluded for j in out.judgements.values())


@settings(deadline=None, max_examples=200)
@given(
    st.integers(4, 10),
    st.lists(st.floats(1.0, 5.0), min_size=10, max_size=10),
    st.integers(0, 2**32 - 1),
)
def test_honest_heterogeneous_sites_raise_no_flag(n: int, scales: list[float], seed: int) -> None:
    """Sites that share a direction but differ in size (1x to 5x, each steady over rounds)
    and in their own disease-specific directions are never flagged, round after round."""
    rng = np.random.default_rng(seed)
    p = 40
    own = rng.standard_normal((n, p))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    state, pol = Reputation(), Policy(tolerate=1)
    for r in range(1, 6):
        g = rng.standard_normal(p)
        g /= np.linalg.norm(g)
        ups = {
            f"h{i}": scales[i] * (g + 0.8 * own[i] + 0.2 * rng.standard_normal(p) / np.sqrt(p))
            for i in range(n)
        }
        out = judge_round(state, pol, r, ups)
        state = out.state
        assert all(j.flags == () for j in out.judgements.values()), (r, out.judgements)


# ---------------------------------------------------------------- aggregation per round


def test_rule_for_round_is_sized_by_the_declared_f() -> None:
    """f = 0: clipped weighted mean (nothing trimmed); f = 2 with one excluded: trim 1;
    f = 1 over four updates: two kept values per coordinate are too few, so no trimming."""
    ups = [np.full(3, float(i)) for i in range(1, 8)]
    ws = [float(i) for i in range(1, 8)]
    rule, info = rule_for_round("clipped_trimmed_mean", 0, 0, 7)
    assert np.allclose(rule(ups, ws), fedavg(ups, ws)) and info["trim"] == 0
    assert info["clip"] == f"{CLEAN_CLIP_MULTIPLE:g}x median norm"
    med = float(np.median([np.linalg.norm(u) for u in ups]))
    clipped = [u * min(1.0, med / np.linalg.norm(u)) for u in ups]
    rule, info = rule_for_round("clipped_trimmed_mean", 2, 1, 7)
    assert np.allclose(rule(ups, ws), trimmed_mean(trim=1)(clipped, ws)) and info["trim"] == 1
    four, fw = ups[:4], ws[:4]
    med4 = float(np.median([np.linalg.norm(u) for u in four]))
    clipped4 = [u * min(1.0, med4 / np.linalg.norm(u)) for u in four]
    rule, info = rule_for_round("clipped_trimmed_mean", 1, 0, 4)
    assert info["trim"] == 0 and np.allclose(rule(four, fw), fedavg(clipped4, fw))
    assert rule_for_round("clipped_trimmed_mean", 1, 0, 5)[1]["trim"] == 1  # 3 values kept
    with pytest.raises(ConfigError):
        rule_for_round("clipped_trimmed_mean", -1, 0, 3)


def test_probation_needs_judged_clean_rounds_or_a_long_quiet() -> None:
    """Rounds in which nobody's direction can be judged (no consensus) do not count as clean
    for a quarantined site; twelve quiet rounds re-admit it all the same."""
    pol = Policy(tolerate=1)
    state = Reputation(2, {"h4": Standing(strikes=2.0, quarantined=True)})
    quiet = {f"h{i}": E[i] + 0.3 * E[7] for i in range(5)}  # pairwise cosines 0.08: no gate
    for r in range(3, 14):
        out = judge_round(state, pol, r, quiet)
        state = out.state
        assert out.judgements["h4"].excluded and not out.events, r
    assert state.get("h4").clean_streak == 0 and state.get("h4").quiet == 11
    out = judge_round(state, pol, 14, quiet)
    assert [e[0] for e in out.events] == ["hospital_readmitted"]
    assert out.events[0][2]["quiet_rounds"] == 12


def test_probation_needs_agreement_not_just_no_flag() -> None:
    """Judged rounds in which a quarantined site mildly opposes the others (cosine -0.1, above
    the -0.3 flag line) are not clean rounds: not opposing enough is no sign of honesty."""
    pol = Policy(tolerate=1)
    state = Reputation(2, {"h4": Standing(strikes=2.0, quarantined=True)})
    ups = _agreeing(4)
    ups["h4"] = -0.1 * E[0] + E[7]
    for r in range(3, 7):
        out = judge_round(state, pol, r, ups)
        state = out.state
        assert out.judgements["h4"].flags == () and out.judgements["h4"].excluded
    assert state.get("h4").clean_streak == 0
