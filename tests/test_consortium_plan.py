"""medimesh.consortium_plan: the decisions the composition root carries out, without Ray."""

from __future__ import annotations

import pytest

from medimesh.consortium_plan import (
    SERVICES,
    adversary_plan,
    coordinator_config,
    pushed_nodes,
    remote_members,
    remote_setup,
    role_actor_name,
    run_info,
    silent_at_setup,
    validator_bounds,
)
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Member, Roster
from medimesh.privacy import PrivacyConfig
from medimesh.run_config import RunConfig, site_descriptors, spec_hash
from medimesh.sites import dataset_info

NODES = [*SERVICES, "hospital-01", "hospital-02"]


def test_the_router_pushes_to_services_and_hospitals_unless_they_poll_the_front() -> None:
    assert pushed_nodes(NODES, over_axl=False, remote=False) == [
        "validator", "coordinator", "hospital-01", "hospital-02"]
    # AXL transport: hospitals poll their mailboxes at the front; nothing is pushed to them.
    assert pushed_nodes(NODES, over_axl=True, remote=False) == ["validator", "coordinator"]
    # Remote hospitals send their audit events through the router to the auditor.
    assert pushed_nodes(SERVICES, over_axl=False, remote=True) == [
        "auditor", "validator", "coordinator"]
    assert [role_actor_name(n) for n in ("auditor", "coordinator", "hospital-01")] == [
        "auditor", "coordinator", "hospital:hospital-01"]


def test_adversary_plan_names_colluders_the_victim_and_refuses_unknown_sites() -> None:
    sites = ["hospital-01", "hospital-02", "hospital-03", "hospital-04"]
    plan = adversary_plan(sites, [("hospital-02", "alie"), ("hospital-03", "frame_duplicate"),
                                  ("hospital-04", "sign_flip")])
    assert plan.colluding == ("hospital-02", "hospital-03")
    assert plan.n_colluding == 1  # framing alone is not a colluding attack
    assert plan.victim == "hospital-01"  # the first honest site
    assert plan.hospital("hospital-01") == "honest" and plan.hospital("hospital-04") == "sign_flip"
    honest = adversary_plan(sites, [])
    assert honest.colluding == () and honest.victim is None and honest.n_colluding == 0
    with pytest.raises(ConfigError, match="unknown sites"):
        adversary_plan(sites, [("hospital-09", "alie")])


def test_validator_bounds_follow_central_dp_and_turn_scoring_off() -> None:
    cfg = RunConfig(max_update_norm=7.0, validator_scoring=True)
    assert validator_bounds(cfg, None) == (7.0, True)
    central = PrivacyConfig(mode="central", clip_norm=0.5)
    bound, scoring = validator_bounds(cfg, central)
    assert bound == pytest.approx(0.5 * (1 + 1e-4)) and not scoring
    assert validator_bounds(cfg, PrivacyConfig(mode="local", clip_norm=0.5)) == (7.0, False)


def test_coordinator_config_and_run_info_come_from_the_run_config() -> None:
    cfg = RunConfig(dataset="sparse", hospitals=5, rounds=3, min_updates=None, tolerate=1)
    d = site_descriptors(cfg)[0]
    info = dataset_info(d.kind, d.params)
    cc = coordinator_config(cfg, info, None, "run-x")
    assert cc.min_updates == cfg.quorum == 3 and cc.n_byzantine == 1 and cc.run_id == "run-x"
    assert cc.spec_hash == spec_hash(info) and cc.n_classes == len(info.class_names)
    assert cc.cross_baselines == cfg.cross_baselines_active
    assert run_info(cfg) == {"dataset": "sparse", "hospitals": 5, "rounds_planned": 3,
                             "seed": 0, "aggregator": cfg.aggregator, "cross_baselines": True}


def _roster(hospitals: list[str]) -> Roster:
    roster = Roster()
    for name in ["coordinator", *hospitals]:
        roster.add(Member(name, "coordinator" if name == "coordinator" else "hospital",
                          Identity.generate().peer_id))
    return roster


def test_remote_members_must_be_exactly_the_expected_hospitals() -> None:
    roster = _roster(["a", "b"])
    peers = remote_members(roster, ["b", "a"])
    assert list(peers) == ["b", "a"]
    assert peers["a"] == roster.by_name("a").peer_id
    with pytest.raises(ConfigError, match="this run expects"):
        remote_members(roster, ["a"])


def test_remote_setup_names_the_silent_hospitals_but_not_the_refused() -> None:
    peers = {"a": "p" * 64, "b": "q" * 64, "c": "r" * 64}
    state = {"committed": {"p" * 64: 120}, "test_sizes": {"p" * 64: 30}}
    info, silent = remote_setup(state, {"b"}, peers)
    assert silent == ["c"]
    assert info[0] == {"name": "a", "peer_id": "p" * 64, "n_train": 120, "n_test": 30,
                       "remote": True}
    assert info[1]["n_train"] == 0 == info[2]["n_test"]
    _, nobody = remote_setup({}, set(), peers)
    assert nobody == ["a", "b", "c"]
    err = silent_at_setup(["c"], 60.0, "https://127.0.0.1:9000")
    assert "no answer within 60 s from c" in str(err)
    assert "--axl https://127.0.0.1:9000" in str(err)
