"""The strongest attacks (min-max, min-sum, relay) and the framing attacks, on hand-made vectors.

The system test runs a framing attack through the real consortium (Ray).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest

from medimesh.attacks import (
    ATTACKS,
    COLLUDING,
    FRAMING,
    attack_update,
    framing_victim,
    shejwalkar_gamma,
)
from medimesh.audit import AuditEntry
from medimesh.bench.byzantine import STATISTICAL, audit_summary, names_from, summarize
from medimesh.errors import ConfigError

# Four benign updates in 5 dimensions: spread out, with a common direction.
BENIGN = np.array(
    [
        [1.0, 0.5, -0.2, 0.3, 0.0],
        [0.8, 0.9, 0.1, -0.1, 0.2],
        [1.3, 0.2, 0.0, 0.4, -0.3],
        [0.9, 0.6, -0.4, 0.0, 0.1],
    ]
)
# The near-duplicate tolerance documented in docs/byzantine.md (x the median pairwise distance).
DUPLICATE_TOL = 1e-3


def _att(name: str, **kw: object) -> np.ndarray:
    rng = np.random.default_rng(7)
    return attack_update(name, BENIGN[0], round_=3, rng=rng, **kw)  # type: ignore[arg-type]


def _sq_dists(m: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.asarray(((g - m) ** 2).sum(axis=1))


def _benign_bounds(g: np.ndarray) -> tuple[float, float]:
    sq = ((g[:, None, :] - g[None, :, :]) ** 2).sum(axis=2)
    return float(sq.max()), float(sq.sum(axis=1).max())


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))


def test_new_attacks_are_registered() -> None:
    """The new behaviours are selectable by name; the capability sets name real attacks."""
    assert {"min_max", "min_sum", "relay", "frame_duplicate", "frame_oppose"} <= set(ATTACKS)
    assert (COLLUDING | FRAMING) - set(ATTACKS) == set()
    assert len(set(ATTACKS)) == len(ATTACKS)


def test_min_max_respects_its_bound_with_the_largest_gamma() -> None:
    """Max distance to the benign updates <= their max pairwise one; a larger gamma breaks it."""
    mu, sd = BENIGN.mean(axis=0), BENIGN.std(axis=0)
    out = _att("min_max", colluders=list(BENIGN))
    gamma = shejwalkar_gamma(BENIGN, -sd, "min_max")
    assert gamma > 0
    assert np.allclose(out, mu - gamma * sd)
    bound, _ = _benign_bounds(BENIGN)
    assert _sq_dists(out, BENIGN).max() <= bound
    assert _sq_dists(mu - gamma * (1 + 1e-6) * sd, BENIGN).max() > bound
    # Closed form: the smallest positive root of |mu + gamma p - g_j|^2 = bound over j.
    p = -sd
    roots = []
    for g in BENIGN:
        a, b, c = p @ p, 2 * (mu - g) @ p, (mu - g) @ (mu - g) - bound
        roots.append((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    assert gamma == pytest.approx(min(roots), rel=1e-7)


def test_min_sum_respects_its_bound_with_the_largest_gamma() -> None:
    """Sum of squared distances <= the benign maximum; gamma* = max_i |g_i - mu| / |p|."""
    mu, sd = BENIGN.mean(axis=0), BENIGN.std(axis=0)
    out = _att("min_sum", colluders=list(BENIGN))
    gamma = shejwalkar_gamma(BENIGN, -sd, "min_sum")
    assert np.allclose(out, mu - gamma * sd)
    _, bound = _benign_bounds(BENIGN)
    assert _sq_dists(out, BENIGN).sum() <= bound
    assert _sq_dists(mu - gamma * (1 + 1e-6) * sd, BENIGN).sum() > bound
    expected = np.linalg.norm(BENIGN - mu, axis=1).max() / np.linalg.norm(sd)
    assert gamma == pytest.approx(expected, rel=1e-7)
    # min-sum is the stricter constraint: it never goes further than min-max.
    assert gamma <= shejwalkar_gamma(BENIGN, -sd, "min_max")


@pytest.mark.parametrize("deviation", ["unit_vec", "sign"])
def test_other_perturbations_keep_the_bound(deviation: str) -> None:
    """-mu/|mu| and -sign(mu) move against the benign mean, within the same bound."""
    mu = BENIGN.mean(axis=0)
    out = _att("min_max", colluders=list(BENIGN), deviation=deviation)
    bound, _ = _benign_bounds(BENIGN)
    assert _sq_dists(out, BENIGN).max() <= bound
    assert (out - mu) @ mu < 0


def test_min_max_with_one_colluder_sends_its_honest_update() -> None:
    """One colluder knows no spread to hide in: gamma = 0 (a documented limit)."""
    assert np.allclose(_att("min_max"), BENIGN[0])
    assert np.allclose(_att("min_sum", colluders=[BENIGN[0]]), BENIGN[0])
    assert shejwalkar_gamma(BENIGN[:1], -np.ones(5), "min_max") == 0.0
    with pytest.raises(ConfigError):
        shejwalkar_gamma(BENIGN, -np.ones(5), "max_min")
    with pytest.raises(ConfigError):
        _att("min_max", colluders=list(BENIGN), deviation="wide")


def test_relay_stays_just_inside_the_radius_against_the_trajectory() -> None:
    """|out - c| = margin * median |g_i - c| <= that radius, pointing against the trajectory."""
    c = np.array([0.3, 0.2, 0.0, 0.1, 0.0])
    t = np.array([1.0, 0.5, 0.0, 0.2, 0.0])
    out = _att("relay", colluders=list(BENIGN), previous=c, trajectory=t)
    radius = float(np.median(np.linalg.norm(BENIGN - c, axis=1)))
    assert np.linalg.norm(out - c) <= radius
    assert np.linalg.norm(out - c) == pytest.approx(0.9 * radius)
    assert _cos(out - c, t) == pytest.approx(-1.0)
    # Without a trajectory: against the previous step; in round 1 (no step): honest.
    out2 = _att("relay", colluders=list(BENIGN), previous=c)
    assert _cos(out2 - c, c) == pytest.approx(-1.0)
    alone = _att("relay", previous=c)  # one colluder: the radius is its own distance to c
    assert np.linalg.norm(alone - c) == pytest.approx(0.9 * np.linalg.norm(BENIGN[0] - c))
    assert np.array_equal(_att("relay"), BENIGN[0])
    with pytest.raises(ConfigError):
        _att("relay", margin=1.5)


def test_frame_duplicate_is_a_near_duplicate_of_the_victim() -> None:
    """Within the near-duplicate tolerance of the victim, yet not a byte-identical copy."""
    victim = BENIGN[1]
    out = _att("frame_duplicate", victim=victim)
    sq = ((BENIGN[:, None, :] - BENIGN[None, :, :]) ** 2).sum(axis=2)
    typical = float(np.median(np.sqrt(sq[np.triu_indices(len(BENIGN), 1)])))
    gap = float(np.linalg.norm(out - victim))
    assert 0 < gap <= DUPLICATE_TOL * typical
    assert gap == pytest.approx(1e-5 * np.linalg.norm(victim))
    with pytest.raises(ConfigError, match="victim"):
        _att("frame_duplicate")


def test_frame_oppose_has_the_intended_norm_and_angles() -> None:
    """Norm 0.8 x cap; cosine `agree` to the others' mean; makes the victim oppose the others."""
    victim, others = BENIGN[1], BENIGN[[0, 2, 3]]
    att = functools.partial(_att, "frame_oppose", victim=victim)
    out = att(colluders=[BENIGN[0]])
    assert np.linalg.norm(out) == pytest.approx(40.0)
    assert np.linalg.norm(att(colluders=[BENIGN[0]], cap=10.0)) == pytest.approx(8.0)
    assert _cos(out, BENIGN[0]) == pytest.approx(0.3)
    assert _cos(out, victim) < -0.2
    # The leave-one-out picture the attacker aims for: the victim's "others" are the attacker
    # and two honest sites; they agree (median pairwise cosine >= 0.2) and the victim opposes
    # their mean (cosine < -0.2).
    rest = np.vstack([out, others[1:]])
    pair = [_cos(rest[i], rest[j]) for i in range(3) for j in range(i + 1, 3)]
    assert float(np.median(pair)) >= 0.2
    assert _cos(victim, rest.mean(axis=0)) < -0.2
    with pytest.raises(ConfigError):
        att(colluders=[BENIGN[0]], agree=1.0)
    parallel = att(colluders=[2 * victim])  # the others agree perfectly: still the norm
    assert np.linalg.norm(parallel) == pytest.approx(40.0)


def test_framing_victim_is_the_first_honest_site() -> None:
    """Deterministic victim choice; None when nobody frames."""
    sites = ["a", "b", "c", "d"]
    assert framing_victim(sites, {"a": "sign_flip", "d": "frame_duplicate"}) == "b"
    assert framing_victim(sites, {"d": "frame_oppose"}) == "a"
    assert framing_victim(sites, {"d": "alie"}) is None
    assert framing_victim(["a"], {"a": "frame_oppose"}) is None


# ---------------------------------------------------------------- the benchmark's report


def _entry(event: str, round_: int, subject: str, body: dict[str, Any]) -> AuditEntry:
    return AuditEntry(0, 0.0, "validator", event, round_, subject, body, "", "", "", "", "")


def _verdict(round_: int, who: str, reasons: list[str], **extra: Any) -> AuditEntry:
    body = {"hospital": who, "accepted": not reasons, "reasons": reasons, "scores": {}, **extra}
    return _entry("verdict", round_, "digest", body)


def test_audit_summary_reads_only_verdicts_and_quarantines() -> None:
    """Honest rejections, exclusions (statistical or quarantine), catches, the victim, per
    round by site name; protocol refusals reject without excluding; extra body keys ignored."""
    names = {"p1": "cleveland", "p2": "hungary", "p3": "switzerland", "p4": "va"}
    entries = [
        _verdict(1, "p1", ["near_duplicate"], flags=[{"reason": "near_duplicate"}]),
        _verdict(1, "p2", []),
        _verdict(1, "p3", ["replay"]),
        _verdict(1, "p4", ["near_duplicate"]),
        _entry("hospital_quarantined", 1, "p4", {"strikes": 1}),
        _entry("round_closed", 1, "hash", {}),
        _verdict(2, "p1", []),
        _verdict(2, "p2", []),
        _verdict(2, "p3", []),
        _verdict(2, "p4", ["quarantined"]),
        _entry("hospital_quarantined", 2, "p2", {"strikes": 1}),
        _entry("hospital_readmitted", 3, "p2", {}),
    ]
    out = audit_summary(entries, names, ["va"], victim="cleveland")
    assert out["honest_updates"] == 6 and out["honest_rejected"] == 2
    assert out["honest_excluded"] == ["cleveland", "hungary"]  # not switzerland: a replay
    assert (out["malicious_caught"], out["malicious_updates"]) == (2, 2)
    assert out["victim_excluded"] is True
    assert out["quarantined"] == ["va", "hungary"] and out["readmitted"] == ["hungary"]
    first = out["rounds"][0]
    assert first["n_accepted"] == 1 and first["accepted"] == ["hungary"]
    assert first["rejected"] == {
        "cleveland": ["near_duplicate"], "switzerland": ["replay"], "va": ["near_duplicate"],
    }
    assert first["verdicts"] == 4
    # A retried round (same number): sites counted once, reasons merged over attempts.
    retried = audit_summary(entries[:4] + entries[:4], names, ["va"])["rounds"][0]
    assert (retried["n_accepted"], retried["n_rejected"], retried["verdicts"]) == (1, 3, 8)
    assert audit_summary([], names, ["va"])["rounds"] == []


def test_summary_over_seeds_and_selections() -> None:
    """Mean/min over seeds and the drop against clean; comma selections are checked."""
    runs = [
        {"top1": 0.8, "honest_updates": 60, "honest_rejected": 1, "honest_excluded": ["a"],
         "malicious_caught": 20, "malicious_updates": 20, "victim": "a", "victim_excluded": True},
        {"top1": 0.7, "honest_updates": 60, "honest_rejected": 0, "honest_excluded": [],
         "malicious_caught": 19, "malicious_updates": 20, "victim": "a",
         "victim_excluded": False},
    ]
    s = summarize(runs, clean_mean=0.85)
    assert s["top1_mean"] == pytest.approx(0.75) and s["top1_min"] == pytest.approx(0.7)
    assert s["drop_vs_clean"] == pytest.approx(0.10)
    assert s["honest_rejected_rate"] == pytest.approx(1 / 120)
    assert s["runs_victim_excluded"] == 1 and s["victim_ever_excluded"]
    assert names_from(None, STATISTICAL, "attack") == STATISTICAL
    assert names_from("relay, min_max,relay", STATISTICAL, "attack") == ("relay", "min_max")
    assert names_from("all", ("a", "b"), "rule") == ("a", "b")
    with pytest.raises(ConfigError, match="unknown attack"):
        names_from("relay,teleport", STATISTICAL, "attack")
    assert {"min_max", "min_sum", "relay", "frame_duplicate", "frame_oppose"} <= set(STATISTICAL)


# ---------------------------------------------------------------- through the real consortium


@pytest.mark.ray
def test_frame_duplicate_never_gets_the_honest_victim_excluded(ray_session: None) -> None:
    """A site copying an honest victim's update (predicted by the attackers' side channel)
    must not get the victim rejected or quarantined."""
    import ray

    from medimesh.actors.runtime import NAMESPACE, Consortium, RunConfig

    cfg = RunConfig(
        hospitals=4, rounds=3, seed=1, behaviours=(("hospital-04", "frame_duplicate"),),
        tolerate=1, round_timeout_s=10.0,
    )
    fed = Consortium(cfg)
    try:
        fed.start()
        fed.run()
        entries = fed.audit_entries()
        channel: Any = ray.get_actor(  # handles are untyped
            f"adversary:colluders@{fed.run_id}", namespace=NAMESPACE
        )
        side: dict[str, int] = dict(ray.get(channel.stats.remote()))
        victim = fed.identities["hospital-01"].peer_id
    finally:
        fed.shutdown()
    assert side["victim_updates"] == 3  # the attack had its input every round
    verdicts = [e.body for e in entries if e.event == "verdict" and e.body["hospital"] == victim]
    assert len(verdicts) == 3
    assert all(v["accepted"] for v in verdicts), [v["reasons"] for v in verdicts]
    assert not [e for e in entries if e.event == "hospital_quarantined" and e.subject == victim]
