"""A multi-node federation on one machine (run by tests/test_multinode.py in its own process).

``ray.cluster_utils.Cluster`` starts a head node and one node per hospital, each advertising
``hospital:<center>`` as deploy/cluster.yaml does. Each hospital's CSV file sits in a folder of
its own node. The federation runs with pinned placement; after round 2 one hospital's node is
removed. Writes OUT_DIR/result.json: where each actor ran, the rounds, what the router reports
for the lost hospital, and the audit verification.

Usage: python tests/multinode_drill.py OUT_DIR
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray._private import state
from ray.cluster_utils import Cluster

from medimesh.actors.runtime import Consortium, RunConfig, hospital_resource
from medimesh.data import heart

CENTERS = ("cleveland", "hungary", "switzerland")
CLASSES = ["no disease", "disease"]


def _write_site(path: Path, center: str, data_dir: Path) -> None:
    site = heart.load_center(data_dir, center, "flamby+missing")
    names = heart.feature_names("flamby+missing")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*names, "label"])
        x = np.vstack([site.x_train, site.x_test])
        y = np.concatenate([site.y_train, site.y_test])
        for row, label in zip(x, y, strict=True):
            w.writerow(["" if np.isnan(v) else repr(float(v)) for v in row] + [CLASSES[label]])


def main(out: Path) -> dict[str, Any]:
    data_dir = heart.default_data_dir()
    if data_dir is None:
        raise SystemExit("../shared/data/heart is not present")
    spec = {
        "label": "label",
        "classes": CLASSES,
        "features": [{"name": n, "type": "numeric"} for n in heart.feature_names("flamby+missing")],
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    # Connect while the head is the only raylet: the driver attaches to the head's raylet, so
    # removing a hospital node later cannot take the driver down with it.
    ray.init(address=cluster.address, namespace="medimesh", log_to_driver=False,
             configure_logging=False)
    nodes = {}
    sites = []
    for center in CENTERS:
        # Each hospital's file lives in its node's own folder (on a real cluster: its own disk).
        path = out / f"node-{center}" / f"{center}.csv"
        _write_site(path, center, data_dir)
        sites.append((center, str(path)))
        nodes[center] = cluster.add_node(num_cpus=1, resources={hospital_resource(center): 1})
    cluster.wait_for_nodes()
    live = [n for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
    node_of_resource = {
        c: next(n["NodeID"] for n in live if n["Resources"].get(hospital_resource(c)))
        for c in CENTERS
    }
    head_id = next(n["NodeID"] for n in live
                   if not any(k.startswith("hospital:") for k in n["Resources"]))
    result: dict[str, Any] = {}

    # Refusal first: a fourth, pinned hospital without a node must not start elsewhere.
    try:
        Consortium(RunConfig(dataset="csv", spec=spec, placement="pinned",
                             csv_sites=(*sites, ("va", sites[0][1])))).start()
        result["missing_node_refused"] = ""
    except Exception as exc:
        result["missing_node_refused"] = f"{type(exc).__name__}: {exc}"

    cfg = RunConfig(dataset="csv", spec=spec, csv_sites=tuple(sites), placement="pinned",
                    rounds=10, round_timeout_s=3.0, seed=0)
    fed = Consortium(cfg)
    fed.start()
    actors = {  # the GCS actor table (the state API would need the dashboard)
        a["Name"]: a["Address"]["NodeID"] for a in state.actors().values()
        if a["State"] == "ALIVE" and a["Name"]
    }
    result["placement"] = {
        name: {"node": node, "expected": node_of_resource.get(name.split(":", 1)[-1].split("@")[0])}
        for name, node in actors.items() if name.startswith("hospital:")
    }
    result["services_on_head"] = sorted(
        name.split("@")[0] for name, node in actors.items()
        if not name.startswith("hospital:") and node == head_id
    )
    removed = CENTERS[-1]
    rounds: list[dict[str, Any]] = []

    victim = next(a for a in state.actors().values()
                  if a["State"] == "ALIVE" and a["Name"].startswith(f"hospital:{removed}@"))

    def on_round(m: dict[str, Any]) -> None:
        rounds.append({"round": m["round"], "accepted": m["accepted"], "top1": m["top1"]})
        if m["round"] == 2:
            # The hospital's machine goes away: its raylet, and (as on a real machine, where
            # they die together) the worker process hosting the hospital actor.
            cluster.remove_node(nodes[removed], allow_graceful=False)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(victim["Pid"]), signal.SIGKILL)
            result["removed_after_round"] = 2

    fed.run(on_round)
    result["rounds"] = rounds
    deadline = time.monotonic() + 30
    status = fed.node_status()
    while status.get(removed) != "down" and time.monotonic() < deadline:
        time.sleep(1)
        status = fed.node_status()
    result["status"] = status
    result["removed"] = removed
    result["audit"] = fed.verify_audit()
    fed.shutdown()
    ray.shutdown()
    cluster.shutdown()  # type: ignore[no-untyped-call]
    return result


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "result.json").write_text(json.dumps(main(target)))
