"""Issue 16: ``medimesh demo --sites processes`` runs each hospital as its own OS process.

The system test runs the real command as a subprocess (its own Ray, never this session's),
reads the pids it printed and reported, checks every round took all three hospitals' updates,
that the router's view (the same dict ``/network`` answers) lists them as processes over AXL,
and that no hospital process is left afterwards. The others check the parts it relies on:
the rare cohort's CSV export reads back to the generator's matrix, an AXL peer's status from
its mailbox polling, and the dashboard's drawing of AXL nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cwd_inside(folder: Path) -> list[int]:
    """Processes whose working directory is inside ``folder`` (a hospital runs in its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").resolve(strict=True)
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            found.append(int(entry.name))
    return found


def test_demo_runs_three_hospital_processes_and_leaves_none_behind(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # its own Ray, not this session's
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(
        [sys.executable, "-m", "medimesh.cli", "demo", "--sites", "processes", "--hospitals",
         "3", "--rounds", "3", "--pace", "0", "--json", "--database-url", "none",
         "--no-ray-dashboard"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    procs = result["processes"]
    sites = {s["name"]: s for s in procs["sites"]}
    assert sorted(sites) == ["hospital-01", "hospital-02", "hospital-03"]
    # The pids the demo printed as it started them are the ones it reports.
    printed = dict(re.findall(r"hospital process (hospital-\d+): pid (\d+)", done.stderr))
    assert {n: int(p) for n, p in printed.items()} == {n: s["pid"] for n, s in sites.items()}
    assert len({s["pid"] for s in sites.values()} | {os.getpid()}) == 4
    # SIGTERM: each node flushed and exited 0; none is running now.
    assert all(s["exit_code"] == 0 for s in sites.values()), sites
    assert not [n for n, s in sites.items() if _alive(s["pid"])]
    assert _cwd_inside(Path(procs["folder"])) == []
    # Every round took the update of each of the three processes.
    assert [r["accepted"] for r in result["rounds"]] == [3, 3, 3]
    assert result["audit"]["ok"] and result["dataset"] == "rare"
    assert result["sites"] == "processes"
    # The router's view: the three hospitals are processes over AXL, polling their mailboxes.
    nodes = {n["name"]: n for n in procs["network"]["nodes"]}
    for name, s in sites.items():
        node = nodes[name]
        assert node["transport"] == "axl" and node["runs_as"] == "process", node
        assert node["pid"] == s["pid"] and node["peer_id"] == s["peer_id"]
        assert node["status"] == "live" and node["last_polled"] is not None
    assert nodes["coordinator"]["transport"] == "ray"
    # Each site's folder holds its own key, roster copy, CSV and state; no patient row in
    # the result or the demo's own output.
    for name, s in sites.items():
        folder = Path(s["folder"])
        assert (folder / "keys" / f"{name}.key").stat().st_mode & 0o077 == 0
        assert (folder / "roster.json").is_file() and (folder / f"{name}.csv").is_file()
        assert (folder / "state" / "setup_result.env").is_file()
        assert "round trained" in (folder / "node.log").read_text()
    assert "hospital-01-p0000" not in done.stdout + done.stderr


def test_the_rare_cohort_as_csv_reads_back_to_the_generators_columns(tmp_path: Path) -> None:
    """The spec's columns are the cohort's features, in order; each CSV encodes to its matrix."""
    from medimesh.data import cohort
    from medimesh.data.cohort_csv import write_sites
    from medimesh.sites import dataset_info
    from medimesh.spec import encode_csv, load_spec

    config = cohort.CohortConfig(n_hospitals=2, seed=3)
    spec_path, sites, rows = write_sites(config, tmp_path)
    spec = load_spec(spec_path)
    assert spec.column_names() == tuple(f.name for f in cohort.features())
    rare, csv = dataset_info("rare"), dataset_info("csv", {"spec": str(spec_path)})
    assert np.array_equal(rare.log_mask, csv.log_mask)
    assert np.array_equal(rare.scale_mask, csv.scale_mask)
    assert rare.class_names == csv.class_names
    for i, (_, path) in enumerate(sites):
        site = cohort.make_site(config, i)
        encoded = encode_csv(path, spec)
        x = np.vstack([site.x_train, site.x_test])
        assert len(encoded.y) == rows[i]
        assert np.array_equal(encoded.x, x, equal_nan=True)
        assert np.array_equal(encoded.y, np.concatenate([site.y_train, site.y_test]))


def test_an_axl_peer_is_live_while_it_polls_its_mailbox() -> None:
    from medimesh.routing import POLL_DOWN_S, POLL_LIVE_S, Mailboxes, mailbox_status

    assert mailbox_status(None, 100.0) == "down"  # never polled: no process behind it
    assert mailbox_status(100.0 - POLL_LIVE_S / 2, 100.0) == "live"
    assert mailbox_status(100.0 - (POLL_LIVE_S + POLL_DOWN_S) / 2, 100.0) == "slow"
    assert mailbox_status(100.0 - POLL_DOWN_S - 1, 100.0) == "down"
    boxes = Mailboxes()
    boxes.open("p")
    boxes.put("p", "s", b"x")
    assert boxes.describe("p", 50.0) == {"transport": "axl", "queued": 1, "last_polled": None,
                                         "status": "down"}
    boxes.pop("p", now=49.0)
    assert boxes.describe("p", 50.0)["status"] == "live"
    assert boxes.describe("p", 50.0)["queued"] == 0


@pytest.mark.parametrize("transport", ["axl", "ray"])
def test_the_dashboard_draws_an_axl_process_with_a_dashed_ring(transport: str) -> None:
    from medimesh.client import _network
    from medimesh.ui.topology import node_views, topology_svg

    net = _network({"source": "router", "nodes": [
        {"peer_id": "r", "name": "router", "role": "router", "reachable": True},
        {"peer_id": "h", "name": "hospital-01", "role": "hospital", "reachable": True,
         "status": "live", "transport": transport, "runs_as": "process", "pid": 4242},
    ], "edges": [{"from": "h", "to": "r", "messages": 3}]})
    svg = topology_svg(node_views(net))
    node = re.search(r'<g class="mm-node" data-name="hospital-01"[^>]*>(.*?)</g>', svg)
    assert node is not None
    assert f'data-transport="{transport}"' in node.group(0)
    if transport == "axl":
        assert "over AXL (process pid 4242)" in node.group(1)
        assert "stroke-dasharray" in node.group(1) and "over AXL</text>" in svg
    else:
        assert "over AXL" not in svg and "stroke-dasharray" not in svg
