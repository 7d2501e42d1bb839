"""DP-FedAvg through the real actors: budget stop, ε in metrics and audit, clip bound checked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from medimesh.model import TrainConfig
from medimesh.privacy import PrivacyConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def dp_run(ray_session: None) -> Iterator[dict[str, Any]]:
    """Three hospitals, a budget planned for 3 rounds, 5 rounds asked for, then 2 more."""
    from medimesh.actors.runtime import Consortium, RunConfig

    privacy = PrivacyConfig(epsilon=1.0, delta=1e-3, rounds=3, clip_norm=0.5)
    cfg = RunConfig(dataset="rare", hospitals=3, rounds=5, seed=3,
                    train=TrainConfig(epochs=2), privacy=privacy)
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
        again = fed.run(rounds=2)
        out = {
            "history": history,
            "again": again,
            "entries": fed.audit_entries(),
            "verify": fed.verify_audit(),
            "z": fed.privacy.z if fed.privacy is not None else None,
        }
    finally:
        fed.shutdown()
    yield out


def test_training_stops_cleanly_when_the_next_round_would_exceed_the_budget(
    dp_run: dict[str, Any],
) -> None:
    """5 rounds asked, 3 fit the budget: 3 run, the stop is audited, a later run adds none."""
    assert [m["round"] for m in dp_run["history"]] == [1, 2, 3]
    assert dp_run["again"] == []
    stops = [e for e in dp_run["entries"] if e.event == "privacy_budget_exhausted"]
    assert len(stops) == 2  # once per run() call, each before any round was started
    assert stops[0].body["epsilon_spent"] <= 1.0 < stops[0].body["epsilon_next"]
    assert dp_run["verify"]["ok"]
    # No isolated model is shown to peers under DP (docs/privacy.md §5).
    (setup,) = [e for e in dp_run["entries"] if e.event == "setup_completed"]
    assert setup.body["cross_baselines"] is False
    assert all(b["all_sites_top1"] is None for b in setup.body["baselines"].values())


def test_every_round_reports_its_cumulative_epsilon(dp_run: dict[str, Any]) -> None:
    """ε grows each round, ends within the budget, and appears in metrics and audit."""
    eps = [m["epsilon"] for m in dp_run["history"]]
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] <= 1.0
    assert all(m["delta"] == 1e-3 for m in dp_run["history"])
    spent = [e for e in dp_run["entries"] if e.event == "privacy_spent"]
    assert [e.body["epsilon"] for e in spent] == eps
    assert all(e.body["noise_multiplier"] == dp_run["z"] for e in spent)
    closed = [e.body for e in dp_run["entries"] if e.event == "round_closed"]
    assert [c["epsilon"] for c in closed] == eps


def test_validator_checks_the_clip_bound_and_accepts_honest_dp_updates(
    dp_run: dict[str, Any],
) -> None:
    """Central-mode updates are mean clipped gradients: norm <= C, every one accepted."""
    verdicts = [e.body for e in dp_run["entries"] if e.event == "verdict"]
    assert len(verdicts) == sum(m["accepted"] for m in dp_run["history"]) >= 3, verdicts
    assert all(v["accepted"] for v in verdicts), verdicts
    assert all(0 < v["scores"]["norm"] <= 0.5 * (1 + 1e-4) for v in verdicts), verdicts


def test_local_mode_trains_through_the_actors(ray_session: None) -> None:
    """Local DP: hospitals noise their own sums; the run completes and reports ε."""
    from medimesh.actors.runtime import Consortium, RunConfig

    privacy = PrivacyConfig(epsilon=2.0, delta=1e-3, rounds=2, mode="local")
    cfg = RunConfig(dataset="rare", hospitals=2, rounds=2, seed=4,
                    train=TrainConfig(epochs=2), privacy=privacy)
    fed = Consortium(cfg)
    try:
        fed.start()
        history = fed.run()
    finally:
        fed.shutdown()
    assert [m["round"] for m in history] == [1, 2]
    assert history[-1]["epsilon"] <= 2.0 and history[-1]["accepted"] == 2
