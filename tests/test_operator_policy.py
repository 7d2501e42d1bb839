"""Issue 15, attack 7: a hostile coordinator pushes a hospital past its own policy.

The system tests run the same scenarios as ``medimesh bench operator`` (real router, hospital
actors, PostgreSQL audit) and check the evidence: the ``policy_refused`` audit entries, what
actually reached the operator, and the hospital's own spend. The unit tests check the pure
policy (medimesh.policy) rule by rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medimesh.bench.operator import Lab
from medimesh.bench.operator.hospital_policy import (
    dp_budget_exhausted,
    dp_replayed_round,
    dp_weaker_noise,
    eval_counting_oracle,
)
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Member, Roster
from medimesh.model import Model, init_model, model_hash
from medimesh.policy import HospitalPolicy, PolicyConfig, PolicyRefused
from medimesh.privacy import PrivacyConfig
from medimesh.protocol import EvalReport, RoundStart, Update

# ------------------------------------------------------------------------ the pure policy

COORD = Identity.generate().peer_id


def _roster() -> Roster:
    roster = Roster()
    roster.add(Member("coordinator", "coordinator", COORD))
    return roster


def _local(**kw: Any) -> PolicyConfig:
    p = PrivacyConfig(epsilon=1.0, delta=1e-4, rounds=2, mode="local", clip_norm=0.5)
    return PolicyConfig(privacy=p.calibrated(), **kw)


def _start(r: int, z: float, clip: float = 0.5, mode: str = "local", shift: float = 0.0
           ) -> RoundStart:
    m = init_model(3, 2)
    w = (m.weights + shift).astype(np.float32)
    b = m.bias.astype(np.float32)
    return RoundStart(r, model_hash(Model(w, b)), 0.0, w, b, 1, 0.1, 0.0, 0.0, clip, {}, mode, z)


def _update(start: RoundStart, value: float) -> Update:
    return Update(start.round, start.base_hash, 10, np.full((3, 2), value, np.float32),
                  np.zeros(2, np.float32), {})


def _train(policy: HospitalPolicy, start: RoundStart, value: float) -> Update:
    assert policy.admit_round(start, COORD) is None
    update = _update(start, value)
    policy.record_round(start, COORD, update)
    return update


def test_weaker_dp_than_the_hospitals_own_is_refused_with_rule_asked_and_limit() -> None:
    """Less noise, a larger clip, a weaker mode: refused, naming the rule, asked value, limit."""
    policy = HospitalPolicy(_roster(), _local(), n_train=1000)
    z = policy.config.privacy.z  # type: ignore[union-attr]
    cases = [
        (_start(1, z / 2), "dp_noise_multiplier"),
        (_start(1, z, clip=1.0), "dp_clip_norm"),
        (_start(1, z, mode="central"), "dp_mode"),
        (_start(1, 0.0, mode=""), "dp_mode"),
    ]
    for start, rule in cases:
        with pytest.raises(PolicyRefused) as info:
            policy.admit_round(start, COORD)
        assert info.value.rule == rule
        body = info.value.to_audit()
        assert set(body) == {"rule", "asked", "limit"}
    with pytest.raises(PolicyRefused, match="not_coordinator"):
        policy.admit_round(_start(1, z), Identity.generate().peer_id)
    assert policy.admit_round(_start(1, z * 2, clip=0.25), COORD) is None  # stronger is fine


def test_rounds_increase_and_a_retry_gets_the_same_update_not_a_fresh_release() -> None:
    policy = HospitalPolicy(_roster(), _local(), n_train=1000)
    z = policy.config.privacy.z  # type: ignore[union-attr]
    first = _train(policy, _start(1, z), 0.3)
    again = policy.admit_round(_start(1, z), COORD)
    assert again is not None and again.to_payload() == first.to_payload()
    assert policy.dp_rounds == 1
    assert [e[0] for e in policy.drain_events()] == ["hospital_privacy_spent", "round_repeated"]
    with pytest.raises(PolicyRefused, match="round_rebased"):
        policy.admit_round(_start(1, z, shift=0.1), COORD)
    with pytest.raises(PolicyRefused, match="round_not_fresh"):
        policy.admit_round(_start(0, z), COORD)


def test_the_budget_is_the_hospitals_own_and_survives_a_restart_through_its_state() -> None:
    policy = HospitalPolicy(_roster(), _local(), n_train=1000)
    z = policy.config.privacy.z  # type: ignore[union-attr]
    _train(policy, _start(1, z), 0.1)
    _train(policy, _start(2, z), 0.2)
    with pytest.raises(PolicyRefused) as info:
        policy.admit_round(_start(3, z), COORD)
    assert info.value.rule == "dp_budget" and info.value.asked > 1.0 == info.value.limit
    again = HospitalPolicy(_roster(), _local(), 1000, policy.state_json())
    assert again.dp_rounds == 2 and again.last_round(COORD) == 2
    with pytest.raises(PolicyRefused, match="dp_budget"):
        again.admit_round(_start(3, z), COORD)
    lost = HospitalPolicy(_roster(), _local(), 1000, state_lost=True)
    with pytest.raises(PolicyRefused, match="dp_state_lost"):
        lost.admit_round(_start(3, z), COORD)
    with pytest.raises(PolicyRefused, match="dp_delta"):  # δ >= 1/n for its own patients
        HospitalPolicy(_roster(), _local(), n_train=10_000).admit_round(_start(1, z), COORD)


def test_evaluations_are_budgeted_per_round_and_in_total_and_repeats_are_cached() -> None:
    policy = HospitalPolicy(_roster(), PolicyConfig(evals_per_round=1, max_evaluations=2), 100)
    assert policy.admit_evaluation("a") is None
    policy.record_evaluation(EvalReport(1, "a", 50, 20, 30, 12.5))
    cached = policy.admit_evaluation("a", 7)
    assert cached == EvalReport(7, "a", 50, 20, 30, 12.5)
    with pytest.raises(PolicyRefused, match="eval_per_round"):
        policy.admit_evaluation("b")
    _train(policy, _start(1, 0.0, mode=""), 0.0)  # a trained round opens the next window
    assert policy.admit_evaluation("b") is None
    policy.record_evaluation(EvalReport(2, "b", 50, 21, 30, 12.0))
    _train(policy, _start(2, 0.0, mode=""), 0.0)
    with pytest.raises(PolicyRefused, match="eval_total"):
        policy.admit_evaluation("c")


def test_a_hospital_that_missed_rounds_still_scores_the_new_base_and_trains() -> None:
    """A partitioned or restarted hospital scored the last model it saw (window used up) and
    then gets a fresh round on a base it never saw: the base is scored as part of that round,
    outside the window, or the hospital would be locked out of training for good."""
    policy = HospitalPolicy(_roster(), PolicyConfig(evals_per_round=1, max_evaluations=None), 100)
    assert policy.admit_evaluation("seen") is None
    policy.record_evaluation(EvalReport(1, "seen", 50, 20, 30, 12.5))
    with pytest.raises(PolicyRefused, match="eval_per_round"):
        policy.admit_evaluation("published-later")  # a published model: the window holds
    assert policy.admit_evaluation("new-base", 5, round_base=True) is None
    policy.record_evaluation(EvalReport(5, "new-base", 50, 22, 31, 11.0), round_base=True)
    with pytest.raises(PolicyRefused, match="eval_per_round"):  # it did not open the window
        policy.admit_evaluation("published-later")


def test_policy_toml_overrides_the_run_defaults_and_refuses_unknown_keys() -> None:
    base = PolicyConfig.from_run(PrivacyConfig(epsilon=1.0, delta=1e-4, rounds=2, mode="local"))
    mine = base.with_toml(
        '[dp]\nnoise_multiplier = 20.0\nclip_norm = 0.25\nepsilon = 0.5\n'
        '[evaluation]\nper_round = 0\ntotal = 3\n'
    )
    assert mine.privacy is not None and mine.privacy.z == 20.0
    assert (mine.privacy.clip_norm, mine.privacy.epsilon) == (0.25, 0.5)
    assert (mine.evals_per_round, mine.max_evaluations) == (0, 3)
    assert mine.privacy.mode == "local" and mine.privacy.delta == 1e-4
    with pytest.raises(ConfigError, match="allowed keys"):
        base.with_toml("[dp]\nnoise = 1.0\n")
    with pytest.raises(ConfigError, match=r"policy\.toml"):
        base.with_toml("[dp\n")


# --------------------------------------------------------------- attacks on the real system


def _lab(tmp_path: Path, pg: Any) -> Lab:
    return Lab(tmp_path, pg.get_uri())


@pytest.mark.ray
def test_dp_weaker_noise_is_refused_by_every_hospital(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """Less noise, 10x clip, central, no DP: refused by all three, nothing leaves; the agreed
    parameters are still answered."""
    out = dp_weaker_noise(_lab(tmp_path, pg))
    d = out.details
    assert d["updates_leaked"] == 0
    assert d["refusals"] == {"dp_noise_multiplier": 3, "dp_clip_norm": 3, "dp_mode": 6}, d
    assert len(d["answered_agreed_round"]) == 3
    assert out.attempted and out.detected and out.honest_loss == "nothing"


@pytest.mark.ray
def test_dp_replayed_round_buys_no_extra_release(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """Replays and a re-sent round 1 get the same update byte for byte (one release each);
    another base for round 1 and round 0 are refused; each hospital counted one release."""
    out = dp_replayed_round(_lab(tmp_path, pg))
    d = out.details
    assert all(n == 4 for n in d["updates_per_hospital"].values()), d
    assert set(d["distinct_releases_per_hospital"].values()) == {1}, d
    assert d["round_repeated_entries"] == 9
    assert d["refusals"] == {"round_rebased": 3, "round_not_fresh": 3}, d
    assert set(d["hospital_dp_rounds"].values()) == {1}, d
    assert out.detected


@pytest.mark.ray
def test_dp_budget_exhausted_is_refused_and_the_spend_survives_a_restart(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """Two releases fit ε = 1; the third is refused (dp_budget) — also by a hospital Ray
    restarted, which read its spend back from its own state directory."""
    out = dp_budget_exhausted(_lab(tmp_path, pg))
    d = out.details
    assert d["releases_per_hospital"] == {n: 2 for n in d["releases_per_hospital"]}
    assert len(d["releases_per_hospital"]) == 3
    assert d["refusals"] == {"dp_budget": 3}
    assert d["after_restart"] == {"dp_budget": 1}
    assert d["restarted_policy"]["dp_rounds"] == 2, d
    state = tmp_path / "hospital-state" / d["restarted"] / "policy_state.json"
    assert state.is_file() and '"dp_rounds": 2' in state.read_text()
    assert out.detected


@pytest.mark.ray
def test_eval_counting_oracle_gets_one_count_per_round_and_cached_repeats(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    out = eval_counting_oracle(_lab(tmp_path, pg))
    d = out.details
    assert d["refusals"] == {"eval_per_round": 21}, d
    assert set(d["distinct_models_scored"].values()) == {1}, d
    assert set(d["reports_per_hospital"].values()) == {2}, d
    assert d["cached_answer_for_repeat"] is True
    assert out.detected
