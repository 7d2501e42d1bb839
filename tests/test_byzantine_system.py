"""Dishonest hospitals on real actors: the validator catches them, training goes on."""

from __future__ import annotations

import pytest
import ray

from medimesh.actors.runtime import Consortium, RunConfig

pytestmark = pytest.mark.ray


def test_statistical_and_protocol_cheaters_are_refused_and_audited(ray_session: None) -> None:
    """A scaling attacker, a NaN sender and a forger are refused; honest sites all accepted."""
    behaviours = (
        ("hospital-04", "scaling"),
        ("hospital-05", "non_finite"),
        ("hospital-06", "forged_signature"),
    )
    cfg = RunConfig(hospitals=6, rounds=4, seed=4, behaviours=behaviours, round_timeout_s=2.0)
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
        entries = fed.audit_entries()
        names = {fed.identities[d.name].peer_id: d.name for d in fed.descriptors}
        report = fed.verify_audit()
    finally:
        fed.shutdown()
    assert report["ok"]
    assert all(m["accepted"] == 3 for m in history[1:])  # rounds 2-4: only the honest three
    verdicts = [e for e in entries if e.event == "verdict"]
    honest = [v for v in verdicts if names.get(v.body["hospital"]) in
              ("hospital-01", "hospital-02", "hospital-03")]
    assert honest and all(v.body["accepted"] for v in honest)
    scaling = [v.body for v in verdicts if names.get(v.body["hospital"]) == "hospital-04"]
    assert scaling and not any(v["accepted"] for v in scaling)
    assert {r for v in scaling for r in v["reasons"]} & {"norm_outlier", "distance_outlier",
                                                          "quarantined"}
    nan = [v.body for v in verdicts if names.get(v.body["hospital"]) == "hospital-05"
           and v.round >= 2]
    assert nan and all(v["reasons"][0] == "non_finite" for v in nan)
    refused = [e.body for e in entries if e.event == "message_refused"]
    assert len([r for r in refused if r["reason"] == "BadSignature"]) >= 3
    assert history[-1]["top1"] > 0.5


def _names(fed: Consortium) -> dict[str, str]:
    return {fed.identities[d.name].peer_id: d.name for d in fed.descriptors}


def test_with_f_declared_a_repeat_offender_is_quarantined_and_a_restarted_validator_keeps_it(
    ray_session: None,
) -> None:
    """f = 1: a x10 scaler is excluded, quarantined after two flags, and still on probation
    after the validator actor is killed and restarted (its state comes back from the trail);
    the honest hospitals are never excluded. (A scaler, not a sign-flipper: the norm test
    fires every round whatever the data, while the direction test is judged only in rounds
    where the honest updates agree — on the staged rare cohort mostly round 1.)"""
    cfg = RunConfig(hospitals=5, rounds=3, seed=4, tolerate=1, round_timeout_s=2.0,
                    behaviours=(("hospital-05", "scaling"),))
    fed = Consortium(cfg)
    try:
        fed.start()
        first = fed.run()
        before = [e for e in fed.audit_entries() if e.event == "hospital_quarantined"]
        ray.kill(fed.handles["validator"], no_restart=False)
        later = fed.run(rounds=3)
        entries = fed.audit_entries()
        names = _names(fed)
        report = fed.verify_audit()
    finally:
        fed.shutdown()
    assert report["ok"], report
    assert [names[e.subject] for e in before] == ["hospital-05"]
    restored = [e for e in entries if e.event == "validator_restored"]
    assert restored and [names[p] for p in restored[0].body["quarantined"]] == ["hospital-05"]
    verdicts = [e for e in entries if e.event == "verdict"]
    honest = [v for v in verdicts if names[v.body["hospital"]] != "hospital-05"]
    assert honest and all(v.body["accepted"] for v in honest)
    after = [v for v in verdicts
             if names[v.body["hospital"]] == "hospital-05" and v.round > first[-1]["round"]]
    # Still on probation right after the restart (a fresh validator would have accepted it);
    # re-admission needs three clean rounds, counted across the restart.
    assert after and not after[0].body["accepted"], [(v.round, v.body["reasons"]) for v in after]
    assert "quarantined.threshold" in after[0].body["scores"]  # judged as a known suspect
    readmitted = [e for e in entries if e.event == "hospital_readmitted"]
    assert all(e.round >= before[0].round + 3 for e in readmitted)
    # Every round names who was excluded, why, with score and threshold where measured.
    for m in [*first, *later]:
        for row in m["excluded"]:
            assert row["hospital"] == "hospital-05" and row["reason"]
            assert {"score", "threshold"} <= set(row), row


def test_with_f0_declared_flags_are_audited_but_nobody_is_excluded(ray_session: None) -> None:
    """The default (f = 0): the same sign-flipper is flagged in the trail and in the round
    metrics, yet every update counts — defaults never drop data on statistics alone."""
    cfg = RunConfig(hospitals=5, rounds=3, seed=4, tolerate=0, round_timeout_s=2.0,
                    behaviours=(("hospital-05", "sign_flip"),))
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
        entries = fed.audit_entries()
        names = _names(fed)
    finally:
        fed.shutdown()
    assert all(m["accepted"] == 5 and m["excluded"] == [] for m in history)
    flagged = [e.body for e in entries if e.event == "verdict" and e.body["flags"]]
    assert flagged and {names[b["hospital"]] for b in flagged} == {"hospital-05"}
    assert all(f["reason"] == "opposes_others" and f["score"] < f["threshold"]
               for b in flagged for f in b["flags"])
    assert any(row["hospital"] == "hospital-05" for m in history for row in m["flagged"])
    assert not [e for e in entries if e.event == "hospital_quarantined"]
