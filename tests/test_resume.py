"""Coordinator crash and resume; a database outage in the middle of training."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray

from medimesh.actors.runtime import Consortium, RunConfig

pytestmark = pytest.mark.ray


def _wait_rounds(coordinator: Any, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.time() + timeout_s
    seen = 0
    while time.time() < deadline and seen < at_least:
        fresh = ray.get(coordinator.wait_metrics.remote(seen, 1.0))
        if fresh:
            seen = fresh[-1]["round"]
    return seen


def test_killed_coordinator_resumes_at_the_next_round(ray_session: None) -> None:
    """Kill the coordinator mid-run; a new one continues: no round repeated or skipped."""
    fed = Consortium(RunConfig(hospitals=3, rounds=30, seed=2))
    try:
        fed.start()
        coordinator = fed.handles["coordinator"]
        coordinator.run.remote(30)  # left running; we kill it part-way
        assert _wait_rounds(coordinator, 3) >= 3
        resumed = fed.restart_coordinator()
        at = resumed["resumed_at_round"]
        assert at >= 3
        fed.run(rounds=4)
        rounds = ray.get(fed.handles["auditor"].rounds.remote())
        numbers = [r["round"] for r in rounds]
        assert numbers == list(range(1, at + 5)), numbers
        models = {m["model_hash"]: m for m in ray.get(fed.handles["auditor"].models.remote())}
        for r in rounds[1:]:
            parent = models[r["model_hash"]]["parent_hash"]
            assert models[parent]["round"] == r["round"] - 1
        report = fed.verify_audit()
        assert report["ok"], report
        entries = fed.audit_entries()
        events = [e.event for e in entries]
        assert events.count("coordinator_resumed") == 1
        assert events.count("model_published") == at + 4
        # The resumed coordinator continues its checkpoint's run: same id everywhere.
        (resumed_entry,) = [e for e in entries if e.event == "coordinator_resumed"]
        assert resumed_entry.body["run_id"] == fed.run_id == resumed["run_id"]
        assert {e.body["run_id"] for e in entries if e.event == "model_published"} == {
            fed.run_id}
        assert fed.final_model()["run_id"] == fed.run_id
    finally:
        fed.shutdown()


def test_database_outage_mid_training_loses_nothing(ray_session: None, tmp_path: Path) -> None:
    """Stop PostgreSQL for 10 s while rounds run: afterwards every entry is there once."""
    from medimesh.store import embedded_server

    data_dir = tmp_path / "pg"
    server = embedded_server(data_dir)
    fed = Consortium(RunConfig(hospitals=3, rounds=10_000, seed=3, database_url=server.get_uri()))
    try:
        fed.start()
        coordinator, auditor = fed.handles["coordinator"], fed.handles["auditor"]
        done = coordinator.run.remote(400)
        _wait_rounds(coordinator, 5)
        server.cleanup()  # the database goes away mid-training
        time.sleep(10)
        backlog_during_outage = ray.get(auditor.backlog.remote())
        server = embedded_server(data_dir)
        history = ray.get(done)
        assert len(history) == 400 and all(m["accepted"] == 3 for m in history)
        assert backlog_during_outage > 0
        fed.flush_audit()
        assert ray.get(auditor.flush.remote(30.0))
        assert ray.get(auditor.backlog.remote()) == 0
        entries = fed.audit_entries()
        seqs = [e.seq for e in entries]
        assert seqs == list(range(1, len(seqs) + 1))
        report = fed.verify_audit()
        assert report["ok"], report
        assert [r["round"] for r in ray.get(auditor.rounds.remote())] == list(range(1, 401))
    finally:
        fed.shutdown()
        server.cleanup()


def test_a_second_run_on_the_same_database_verifies_the_whole_chain(
    ray_session: None, url: str, tmp_path: Path
) -> None:
    """`make demo` twice in one folder: the second run's chain continues the first's, signed by
    other keys; its verification knows both runs' members (found by running the demo twice)
    from the signed rosters both runs wrote to one roster directory, never the database."""
    entries = []
    rosters = str(tmp_path / "rosters")
    for seed in (1, 2):
        fed = Consortium(RunConfig(hospitals=3, rounds=1, seed=seed, database_url=url,
                                   roster_dir=rosters))
        try:
            fed.start()
            fed.run()
            assert fed.flush_store()
            report = fed.verify_audit()
        finally:
            fed.shutdown()
        assert report["ok"], report
        entries.append(report["entries"])
    assert entries[1] > 2 * entries[0] - 5  # both runs' entries, one chain
