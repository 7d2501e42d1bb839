"""Issue 15, attacks 3 and 4, against the real system: a model nobody trained, an edited
standardization, a privacy budget reset in the checkpoint row.

Each test runs the scenario ``medimesh bench operator`` runs (real Ray actors, real
PostgreSQL, real keys; the attacker is the database owner with SQL) and checks the evidence
itself: the oracle's HTTP answers, the audit entries in the database, the coordinator's error.
Pure pieces (release hash, checkpoint seal through jsonb) are tested below them.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from medimesh.bench.operator import Lab
from medimesh.bench.operator.models import (
    Trained,
    checkpoint_budget_reset,
    checkpoint_rollback,
    model_swapped_standardization,
    model_swapped_weights,
    trained,
)
from medimesh.checkpoint_seal import (
    CheckpointRefused,
    check_not_stale,
    open_checkpoint,
    seal_checkpoint,
)
from medimesh.identity import Identity
from medimesh.model import Model
from medimesh.release import release_hash


def _rows(url: str, sql: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


# ------------------------------------------------------------------------------ attacks


@pytest.fixture(scope="module")
def run(ray_session: None, pg: Any, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One real run (3 hospitals, 2 rounds), stopped: the two model attacks each tamper with
    their own copy of its database (Lab.copy_database); the bench trains one per attack."""
    return trained(Lab(tmp_path_factory.mktemp("run"), pg.get_uri()), seed=11)


@pytest.mark.ray
def test_a_model_nobody_trained_is_never_served(
    ray_session: None, pg: Any, tmp_path: Path, run: Trained
) -> None:
    """A new models row: the running oracle keeps the vouched model and says why it refuses
    the new one; weights edited in place: a started oracle answers 503 naming the reason."""
    out = model_swapped_weights(Lab(tmp_path, pg.get_uri()), run)
    d = out.details
    assert out.attempted and out.detected, out
    final, forged = d["final_model"], d["forged_model"]
    # The served model is the one the audit trail publishes, named by seq and entry hash.
    assert len(d["published_entries"]) == 1
    assert d["before"]["model_hash"] == final
    assert d["before"]["vouched_by"]["seq"] == d["published_entries"][0]["seq"]
    assert d["before"]["vouched_by"]["entry_hash"] == d["published_entries"][0]["entry_hash"]
    after = d["after_new_row"]
    assert after["ready_status"] == 200 and after["served"] == final
    assert after["vouched_by"]["entry_hash"] == d["published_entries"][0]["entry_hash"]
    assert after["refused"]["model_hash"] == forged
    assert "no model_published audit entry names model" in after["refused"]["reason"]
    edit = d["after_edit"]
    assert (edit["ready_status"], edit["diagnose_status"]) == (503, 503)
    assert "do not hash to its name" in edit["refused"]["reason"]
    assert "refused model" in edit["diagnose_detail"]
    # `audit provenance --strict` names the edited model and exits 1.
    done = subprocess.run(
        [sys.executable, "-m", "medimesh.cli", "audit", "provenance", final, "--database-url",
         d["database_url"], "--roster", d["roster_file"], "--strict", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["unvouched"] == [final] and doc["lineage"][0]["weights_match"] is False
    assert doc["lineage"][1]["vouched_by"]["event"] == "model_published"  # round 1: intact
    # The edit was made in this attack's copy: the shared run's database still has the model.
    assert d["database_url"] != run.url
    [row] = _rows(run.url, "SELECT weights FROM models WHERE model_hash = $1", final)
    [edited] = _rows(d["database_url"], "SELECT weights FROM models WHERE model_hash = $1", final)
    assert bytes(row["weights"]) != bytes(edited["weights"])


@pytest.mark.ray
def test_an_edited_standardization_is_refused(
    ray_session: None, pg: Any, tmp_path: Path, run: Trained
) -> None:
    """mean/std edited in the checkpoint row, weights untouched: 503 with the reason."""
    out = model_swapped_standardization(Lab(tmp_path, pg.get_uri()), run)
    d = out.details
    assert out.attempted and out.detected, out
    assert d["before"]["ready_status"] == 200 and d["before"]["vouched_by"] is not None
    after = d["after"]
    assert (after["ready_status"], after["diagnose_status"]) == (503, 503)
    assert after["refused"]["model_hash"] == d["final_model"]
    assert "changed after publication" in after["refused"]["reason"]
    assert "changed after publication" in after["diagnose_detail"]


@pytest.mark.ray
def test_a_reset_privacy_spend_in_the_checkpoint_stops_the_coordinator(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """dp_rounds set to 0 in the checkpoint row: resume raises CheckpointRefused, the trail
    holds checkpoint_refused, and the coordinator neither trains on nor starts over."""
    out = checkpoint_budget_reset(Lab(tmp_path, pg.get_uri()))
    d = out.details
    assert out.attempted and out.detected, out
    assert d["dp_rounds_before_edit"] == 2 and d["resumed"] is None
    assert "CheckpointRefused" in d["resume_error"]
    assert "changed after the coordinator signed it" in d["resume_error"]
    assert "CheckpointRefused" in d["run_after_refusal"]
    [event] = d["audit"]
    assert event["event"] == "checkpoint_refused"
    assert event["round"] == d["newest_checkpoint_round"]
    assert "changed after the coordinator signed it" in event["error"]


@pytest.mark.ray
def test_a_rolled_back_checkpoint_stops_the_coordinator(
    ray_session: None, pg: Any, tmp_path: Path
) -> None:
    """The newest checkpoint rows deleted (an older genuine one spent less): resume raises
    CheckpointRefused naming the later round the trail shows, audited; no round runs."""
    out = checkpoint_rollback(Lab(tmp_path, pg.get_uri()))
    d = out.details
    assert out.attempted and out.detected, out
    assert d["dp_rounds_offered"] < d["dp_rounds_before_edit"] == 2
    assert d["resumed"] is None and "CheckpointRefused" in d["run_after_refusal"]
    assert "is stale" in d["resume_error"]
    [event] = d["audit"]
    assert event["event"] == "checkpoint_refused" and event["round"] == d["resumed_from_round"]
    assert f"published round {d['newest_checkpoint_round']}" in event["error"]


# ------------------------------------------------------------------------------ pure parts


def _model(seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    return Model(rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32))


def test_release_hash_covers_weights_standardization_and_spec() -> None:
    """Any change to the weights, one mean, one std or the spec changes the release hash."""
    m, mean, std = _model(), np.arange(5.0), np.ones(5)
    base = release_hash(m, mean, std, "spec")
    assert base == release_hash(m, mean.tolist(), std.tolist(), "spec")
    w = m.weights.copy()
    w[0, 0] += 1e-3
    assert release_hash(Model(w, m.bias), mean, std, "spec") != base
    assert release_hash(m, mean + np.eye(5)[2] * 1e-9, std, "spec") != base
    assert release_hash(m, mean, std * 1.01, "spec") != base
    assert release_hash(m, mean, std, "other") != base


def test_checkpoint_seal_survives_jsonb_and_catches_edits(url: str) -> None:
    """A sealed checkpoint read back from PostgreSQL jsonb opens; an edit, another signer or
    no seal at all is CheckpointRefused."""
    me = Identity.generate()
    state = {"round": 3, "mean": np.array([0.1, -0.0, 1e20, 1.2345678901234567e-5]),
             "committed": {"a" * 64: 40}, "pending": {"3": {"top1": math.nan, "x": (1, 2)}},
             "dp_rounds": 3, "flag": True}
    sealed = seal_checkpoint(me, 3, "ab" * 32, state)
    [row] = _rows(url, "SELECT $1::jsonb AS s", json.dumps(_plain(sealed)))
    stored = json.loads(row["s"])
    assert open_checkpoint(me.peer_id, 3, "ab" * 32, stored)["dp_rounds"] == 3
    with pytest.raises(CheckpointRefused, match="changed after the coordinator signed it"):
        open_checkpoint(me.peer_id, 3, "ab" * 32, {**stored, "dp_rounds": 0})
    with pytest.raises(CheckpointRefused, match="changed after"):
        open_checkpoint(me.peer_id, 2, "ab" * 32, stored)
    with pytest.raises(CheckpointRefused, match="not by this coordinator"):
        open_checkpoint(Identity.generate().peer_id, 3, "ab" * 32, stored)
    with pytest.raises(CheckpointRefused, match="not signed"):
        open_checkpoint(me.peer_id, 3, "ab" * 32, state)


def test_a_checkpoint_older_than_the_trail_is_stale() -> None:
    """Published rounds up to the checkpoint's pass; a later one is CheckpointRefused."""
    check_not_stale(3, [1, 2, 3])
    check_not_stale(0, [])
    with pytest.raises(CheckpointRefused, match="published round 4"):
        check_not_stale(2, [1, 2, 4])


def _plain(obj: Any) -> Any:
    """What the auditor stores (medimesh.actors.auditor._plain)."""
    from medimesh.actors.auditor import _plain as plain

    return plain(obj)
