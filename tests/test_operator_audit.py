"""Issue 15, attacks 2 and 5, performed against the real system (Ray actors, PostgreSQL, keys).

Each test runs the same scenario as ``medimesh bench operator`` and checks the evidence:
``medimesh audit verify``'s exit code and the entry or sequence number it names, the witness
files the hospitals wrote, the database's refusal — not only the scenario's own verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medimesh.bench.operator import Lab
from medimesh.bench.operator.audit_trail import (
    Trail,
    _entries,
    audit_backpressure_loss,
    audit_disable_trigger,
    audit_empty_signers,
    audit_omit_event,
    audit_rewrite,
    audit_truncate,
    federation,
)

pytestmark = pytest.mark.usefixtures("ray_session")


def lab(tmp_path: Path, pg: Any) -> Lab:
    return Lab(tmp_path, pg.get_uri())


@pytest.fixture(scope="module")
def trail(ray_session: None, pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Trail:
    """One real federation run to the end (3 hospitals witnessing, 2 rounds): each trail
    attack below tampers with its own copy of its database (Lab.copy_database), as the bench
    does with a federation of each scenario's own."""
    return federation(Lab(tmp_path_factory.mktemp("trail"), pg.get_uri()))


def test_empty_signers_table_is_not_a_pass(tmp_path: Path, pg: Any, trail: Trail) -> None:
    """Emptying ``nodes`` and forging an entry: named with --roster, never ok without one."""
    out = audit_empty_signers(lab(tmp_path, pg), trail)
    assert out.attempted and out.detected, out
    with_roster = out.details["with_roster"]
    assert with_roster["exit"] == 1
    report = with_roster["report"]
    assert report["broken_seq"] == out.details["forged_seq"]
    assert "unknown signer: actor" in report["problem"] and report["signers_checked"]
    without = out.details["without_roster"]
    assert without["exit"] == 1 and not without["report"]["ok"]
    assert not without["report"]["signers_checked"]
    assert "signers not checked" in without["report"]["problem"]


def test_truncation_is_named_by_the_witnesses(tmp_path: Path, pg: Any, trail: Trail) -> None:
    """Deleting the newest entries leaves a valid chain; the witnessed heads name the cut."""
    out = audit_truncate(lab(tmp_path, pg), trail)
    assert out.attempted and out.detected, out
    assert out.details["without_witness"]["exit"] == 0  # the chain alone cannot tell
    check = out.details["check"]
    assert check["exit"] == 1
    problems = check["report"]["witness_problems"]
    assert problems and all("truncation" in p["problem"] for p in problems)
    assert {p["length"] for p in problems} >= {out.details["witnessed"]}
    heads = [json.loads(line) for f in trail.witness_dir.rglob("heads.jsonl")
             for line in f.read_text().splitlines()]
    # The final flush sends one more head after the scenario read them: at least that long.
    assert max(h["length"] for h in heads) >= out.details["witnessed"]
    # The cut was made in this scenario's copy: the shared federation's database is whole.
    assert len(_entries(trail.url)) >= out.details["witnessed"] > out.details["cut_from"]


def test_rewrite_with_the_writer_key_is_named(tmp_path: Path, pg: Any, trail: Trail) -> None:
    """A rewritten, re-signed and re-hashed chain verifies alone; the witnesses name it."""
    out = audit_rewrite(lab(tmp_path, pg), trail)
    assert out.attempted and out.detected, out
    assert out.details["without_witness"]["exit"] == 0
    report = out.details["check"]["report"]
    assert out.details["check"]["exit"] == 1 and report["chain_ok"]
    mismatched = [p for p in report["witness_problems"] if "rewritten" in p["problem"]]
    assert mismatched and all(p["length"] >= out.details["rewritten_seq"] for p in mismatched)


def test_omitted_event_is_a_named_gap(tmp_path: Path, pg: Any, trail: Trail) -> None:
    """The writer leaving one validator event out: a gap naming the validator and the number."""
    out = audit_omit_event(lab(tmp_path, pg), trail)
    assert out.attempted and out.detected, out
    check = out.details["check_no_witness"]
    assert check["exit"] == 1 and check["report"]["chain_ok"]
    gaps = check["report"]["actor_gaps"]
    assert [(g["name"], g["missing"]) for g in gaps] == [
        ("validator", [out.details["omitted_actor_seq"]])
    ]
    assert "validator" in check["report"]["problem"]
    assert out.details["check"]["exit"] == 1  # the witnesses see it too


def test_backpressure_loses_nothing(tmp_path: Path, pg: Any) -> None:
    """Appends refused with StoreBackpressure are kept and retried: every event is chained."""
    out = audit_backpressure_loss(lab(tmp_path, pg))
    assert out.attempted and out.detected, out
    assert out.details["refusals"] > 0 and out.details["pending_while_down"] > 0
    assert out.details["stored"] == out.details["recorded"]
    check = out.details["check"]
    assert check["exit"] == 0 and check["report"]["actor_gaps"] == []


def test_app_role_cannot_disable_the_trigger(tmp_path: Path, pg: Any) -> None:
    """The application's login can neither alter the trigger nor update, delete or truncate."""
    out = audit_disable_trigger(lab(tmp_path, pg))
    assert out.attempted and out.detected, out
    refused = out.details["refused"]
    assert out.details["role"] == "medimesh_app"
    assert "must be owner" in refused["disable_trigger"]
    for name in ("update", "delete", "truncate"):
        assert "permission denied" in refused[name], refused
