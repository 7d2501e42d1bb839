"""Dishonest hospitals on real actors: the validator catches them, training goes on."""

from __future__ import annotations

import pytest

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
