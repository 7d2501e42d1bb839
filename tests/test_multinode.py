"""Several Ray nodes on one machine: pinned hospitals, a lost node, training on quorum.

The drill needs a Ray cluster of its own (``ray.cluster_utils.Cluster``: a head and three
hospital nodes), so it runs in a child process rather than on the session's Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medimesh.data import heart

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ray
def test_hospitals_run_on_their_own_nodes_and_training_survives_a_lost_node(
    tmp_path: Path,
) -> None:
    if heart.default_data_dir() is None:
        pytest.skip("../shared/data/heart is not present")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_drill.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env, check=False,
    )
    result_file = tmp_path / "result.json"
    assert proc.returncode == 0 and result_file.exists(), proc.stderr[-3000:]
    r = json.loads(result_file.read_text())

    # A pinned hospital whose node does not exist is refused, not placed elsewhere.
    assert "no node advertises 'hospital:va'" in r["missing_node_refused"]
    # Each hospital actor ran on the node that advertises its resource (and holds its file);
    # the services ran on the head.
    assert len(r["placement"]) == 3
    for name, where in r["placement"].items():
        assert where["node"] == where["expected"], name
    assert len({w["node"] for w in r["placement"].values()}) == 3
    assert r["services_on_head"] == ["auditor", "coordinator", "router", "validator"]
    # The node went away after round 2; every round still closed, on quorum, and the lost
    # hospital's absence shows in the later rounds and in the router's status.
    rounds = r["rounds"]
    assert [m["round"] for m in rounds] == list(range(1, 11))
    assert all(m["accepted"] == 3 for m in rounds[:2])
    assert all(m["accepted"] >= 2 for m in rounds)
    assert all(m["accepted"] == 2 for m in rounds[4:])  # round 3 may have been in flight
    assert rounds[-1]["top1"] > 0.75
    assert r["status"][r["removed"]] == "down"
    assert all(r["status"][n] == "live" for n in ("cleveland", "hungary", "coordinator"))
    assert r["audit"]["ok"], r["audit"]
