"""Fault drills on real actors: crashed hospitals, router and validator restarts, partitions.

One small federation (4 hospitals, 2 s rounds) goes through the drills in order; every drill
must end with rounds closing again and an audit chain that verifies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from medimesh.actors.runtime import Consortium, RunConfig
from medimesh.errors import ConfigError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fed(ray_session: None) -> Iterator[Consortium]:
    cfg = RunConfig(hospitals=4, rounds=2, seed=3, round_timeout_s=2.0)
    f = Consortium(cfg)
    try:
        f.start()
        f.run()
        yield f
    finally:
        f.shutdown()


def _events(fed: Consortium) -> Counter[str]:
    return Counter(e.event for e in fed.audit_entries())


def _verdicts_for(fed: Consortium, name: str, after_round: int) -> list[Any]:
    pid = fed.identities[name].peer_id
    return [
        e for e in fed.audit_entries()
        if e.event == "verdict" and e.body["hospital"] == pid and e.round > after_round
    ]


def _until_all_back(fed: Consortium, most: int = 8) -> list[dict[str, Any]]:
    """More rounds until all four hospitals are accepted again (a restart takes a few seconds
    on a loaded machine, i.e. more or fewer 2 s rounds); at most ``most`` rounds."""
    out: list[dict[str, Any]] = []
    for _ in range(most):
        out += fed.run(rounds=1)
        if out[-1]["accepted"] == 4:
            break
    return out


def test_a_crashed_hospital_is_restarted_and_rejoins(fed: Consortium) -> None:
    """Killed while a round is in flight: the round closes on quorum, Ray restarts the actor,
    the coordinator re-sends it the setup result, and its updates are accepted again."""
    killed: list[int] = []

    def on_round(m: dict[str, Any]) -> None:
        if not killed:
            fed.kill_hospital("hospital-02")
            killed.append(m["round"])

    history = fed.run(on_round, rounds=3)
    assert all(m["accepted"] >= 3 for m in history)
    history += _until_all_back(fed)
    assert history[-1]["accepted"] == 4  # back in
    assert _events(fed)["setup_resent"] >= 1
    accepted_again = [v for v in _verdicts_for(fed, "hospital-02", killed[0] + 1)
                      if v.body["accepted"]]
    assert accepted_again
    assert fed.node_status()["hospital-02"] == "live"


def test_a_partitioned_hospital_is_left_out_and_rounds_close_on_quorum(fed: Consortium) -> None:
    others = ["coordinator", "validator", "hospital-01", "hospital-03", "hospital-04"]
    fed.set_faults(partitions=[["hospital-02"], others])
    try:
        history = fed.run(rounds=2)
    finally:
        fed.set_faults()
    assert [m["accepted"] for m in history] == [3, 3]
    history = _until_all_back(fed)
    assert history[-1]["accepted"] == 4  # healed


def test_router_and_validator_restarts_lose_only_what_was_in_flight(fed: Consortium) -> None:
    """A restarted router finds its peers again by name; a restarted validator learns the round
    from the retried round start. Training goes on; the chain verifies."""
    for service in ("router", "validator"):
        ray.kill(fed.handles[service], no_restart=False)
        history = fed.run(rounds=2)
        history += _until_all_back(fed)
        assert history[-1]["accepted"] == 4, (
            service, [(m["round"], m["accepted"], m["reasons"]) for m in history]
        )
    report = fed.verify_audit()
    assert report["ok"], report


def test_fault_drill_input_is_checked(fed: Consortium) -> None:
    with pytest.raises(ConfigError, match="unknown nodes"):
        fed.set_faults(partitions=[["hospital-99"]])
    with pytest.raises(ConfigError, match="probability"):
        fed.set_faults(drop=1.5)
    with pytest.raises(ConfigError, match="no hospital"):
        fed.kill_hospital("router")
