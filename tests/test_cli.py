"""The command line refuses bad input with one clear line, not a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medimesh.cli import build_parser
from medimesh.model import Model, model_hash
from medimesh.modelfile import save_model

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medimesh.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [["demo", "--hospitals", "0"], ["demo", "--rounds", "-2"], ["demo", "--dataset", "mnist"]],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str]) -> None:
    """argparse-level errors name the flag."""
    out = _run(*args)
    assert out.returncode == 2
    assert "error" in out.stderr and "Traceback" not in out.stderr


def test_missing_heart_data_is_a_clear_error(tmp_path: Path) -> None:
    """A wrong --data-dir is reported in one line before Ray starts."""
    out = _run("demo", "--dataset", "heart", "--data-dir", str(tmp_path / "nope"), "--no-serve")
    assert out.returncode == 2
    assert "heart data not found" in out.stderr and "Traceback" not in out.stderr


def test_bad_alpha_is_a_clear_error() -> None:
    """Domain checks (not just types) produce a one-line error."""
    out = _run("demo", "--alpha", "0", "--no-serve")
    assert out.returncode == 2 and "alpha" in out.stderr and "Traceback" not in out.stderr


def _saved_model(out: Path) -> Path:
    """A one-feature model directory, as `train` writes it (no Ray needed)."""
    spec = {"label": "diagnosis", "classes": ["A", "B"],
            "features": [{"name": "x", "type": "numeric"}]}
    model = Model(np.zeros((1, 2), np.float32), np.zeros(2, np.float32))
    final = {"model_hash": model_hash(model), "round": 1, "mean": [0.0], "std": [1.0],
             "weights": model.weights, "bias": model.bias}
    save_model(out, final, ("A", "B"), ("x",), np.zeros(1, bool), np.ones(1, bool), spec, [])
    return out


def _one_line_naming(out: subprocess.CompletedProcess[str], name: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and lines[0].startswith("medimesh: error:"), lines


def test_missing_csv_for_evaluate_is_one_line(tmp_path: Path) -> None:
    """evaluate with a CSV that is not there names the file; exit 2, no traceback."""
    model = _saved_model(tmp_path / "model")
    out = _run("evaluate", "--csv", str(tmp_path / "missing.csv"), "--model", str(model))
    _one_line_naming(out, "missing.csv")


def test_missing_model_for_evaluate_is_one_line(tmp_path: Path) -> None:
    """evaluate with a model directory that is not there names it."""
    out = _run("evaluate", "--model", str(tmp_path / "missing_dir"), "--csv", "x.csv")
    _one_line_naming(out, "missing_dir")


def test_missing_spec_for_train_is_one_line(tmp_path: Path) -> None:
    """train with a spec file that is not there names it, before Ray starts."""
    out = _run("train", "--spec", str(tmp_path / "missing.json"), "--site", "a=x.csv")
    _one_line_naming(out, "missing.json")


def test_parser_knows_the_documented_commands() -> None:
    """demo, bench accuracy and bench rounds parse with their documented flags."""
    p = build_parser()
    args = p.parse_args(["demo", "--hospitals", "3", "--rounds", "2", "--json", "--no-serve"])
    assert args.hospitals == 3 and args.json and args.no_serve
    args = p.parse_args(["bench", "rounds"])
    assert args.hospitals == 10 and args.rounds == 30
    args = p.parse_args(["bench", "accuracy", "--dataset", "heart"])
    assert args.dataset == "heart"


def test_local_commands_start_their_own_ray_unless_told_otherwise() -> None:
    """No address: a fresh local Ray (never "Connecting to latest cluster" of another job);
    --ray-address or RAY_ADDRESS joins the named cluster, without local-only options."""
    from medimesh.actors.runtime import ray_init_args
    from medimesh.cli import _config, build_parser

    own = ray_init_args(None, {}, num_cpus=2, dashboard=True)
    assert own["address"] == "local" and own["num_cpus"] == 2 and own["include_dashboard"]
    env = ray_init_args(None, {"RAY_ADDRESS": "10.0.0.5:6379"})
    assert env["address"] == "10.0.0.5:6379" and "num_cpus" not in env
    flag = ray_init_args("ray://head:10001", {"RAY_ADDRESS": "elsewhere:6379"})
    assert flag["address"] == "ray://head:10001"
    args = build_parser().parse_args(["train", "--ray-address", "auto", "--spec", "s.json"])
    assert args.ray_address == "auto"
    cfg = _config(build_parser().parse_args(["bench", "accuracy", "--dataset", "heart"]))
    assert cfg.ray_address is None


def test_the_serving_demo_is_paced_so_rounds_can_be_watched() -> None:
    """Serving: 2 s between rounds by default; --no-serve, --json or --pace 0: full speed."""
    from medimesh.cli import DEMO_PACE_S, _config, build_parser

    p = build_parser()
    assert _config(p.parse_args(["demo"])).pace_s == DEMO_PACE_S == 2.0
    assert _config(p.parse_args(["demo", "--no-serve"])).pace_s == 0.0
    assert _config(p.parse_args(["demo", "--json"])).pace_s == 0.0
    assert _config(p.parse_args(["demo", "--pace", "0"])).pace_s == 0.0
    assert _config(p.parse_args(["demo", "--pace", "0.5", "--no-serve"])).pace_s == 0.5
    assert _config(p.parse_args(["bench", "accuracy"])).pace_s == 0.0


def test_the_demo_starts_the_ray_dashboard_on_known_ports() -> None:
    """demo: dashboard on (--no-ray-dashboard: off), train: off (--ray-dashboard: on), both on
    127.0.0.1 at a fixed port with the metrics agent on a fixed port; a taken port moves up;
    a joined cluster keeps its own."""
    import socket

    from medimesh.actors.runtime import (
        DASHBOARD_PORT,
        METRICS_PORT,
        choose_auth_mode,
        free_port,
        ray_init_args,
    )
    from medimesh.cli import _config, build_parser

    p = build_parser()
    demo = _config(p.parse_args(["demo"]))
    assert demo.ray_dashboard and demo.ray_dashboard_port >= DASHBOARD_PORT == 8265
    assert demo.ray_metrics_port is not None and demo.ray_metrics_port >= METRICS_PORT
    assert demo.ray_metrics_port != demo.ray_dashboard_port
    assert not _config(p.parse_args(["demo", "--no-ray-dashboard"])).ray_dashboard
    train = ["train", "--dataset", "sparse"]
    assert not _config(p.parse_args(train)).ray_dashboard
    assert _config(p.parse_args([*train, "--ray-dashboard"])).ray_dashboard
    joined = _config(p.parse_args(["demo", "--ray-address", "auto"]))
    assert joined.ray_metrics_port is None  # the cluster's ports, not ours
    args = ray_init_args(None, {}, dashboard=True, dashboard_port=9265, metrics_port=9266)
    assert args["include_dashboard"] and args["dashboard_host"] == "127.0.0.1"
    assert args["dashboard_port"] == 9265 and args["_metrics_export_port"] == 9266
    remote = ray_init_args("auto", {}, dashboard=True, dashboard_port=9265, metrics_port=9266)
    assert not {"include_dashboard", "dashboard_port", "_metrics_export_port"} & set(remote)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        moved = free_port(port)
        assert moved != port and free_port(moved, avoid=(moved,)) != moved
    env: dict[str, str] = {}
    assert choose_auth_mode(env) == "token" and env == {"RAY_AUTH_MODE": "token"}
    assert choose_auth_mode({"RAY_AUTH_MODE": "disabled"}) == "disabled"


# Lines a user could not act on: Ray's C++ log lines ("[2026-… E 123 123] core_worker.cc…"),
# Python warnings and tracebacks, log records at WARNING or above, "(raylet) Task … failed".
_NOISE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [EWF] \d+ \d+\]|Traceback|\b\w*Warning\b|\bWARN(ING)?\b|"
    r"\bERROR\b|\berror\b|\(raylet\)|\(pid=|failed",
)

# What `demo --no-serve` itself prints (add a prefix here when the demo gains a line).
_DEMO_LINES = (
    "MediMesh demo:", "run ", "started in ", "ray dashboard: ", "ray metrics: ", "round ", "    ",
    "final model ", "router: ", "audit trail: ",
)


def test_the_demo_starts_and_stops_without_warning_or_error_lines() -> None:
    """`medimesh demo --no-serve` with its defaults (the Ray dashboard on): every line it
    prints on start, training and stop is ours. No allow-list: each noise line had a cause that
    is fixed (docs/metrics.md, "Quiet start and stop")."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    dash, metrics = (str(_free_port()) for _ in range(2))
    out = subprocess.run(
        [sys.executable, "-m", "medimesh.cli", "demo", "--no-serve", "--hospitals", "3",
         "--rounds", "2", "--database-url", "none",
         "--ray-dashboard-port", dash, "--ray-metrics-port", metrics],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    noise = [line for line in lines if _NOISE.search(line)]
    assert not noise, "\n".join(noise)
    # Library warnings without a level tag (a Python logger with no handler prints only the
    # message) are caught by requiring every line to be one the demo prints itself.
    strangers = [line for line in lines if line.strip() and not line.startswith(_DEMO_LINES)]
    assert not strangers, "\n".join(strangers)
    assert any(line.startswith(f"ray dashboard: http://127.0.0.1:{dash}") for line in lines)
    assert any(line.startswith("ray metrics: http://") and f":{metrics}/metrics" in line
               for line in lines)
    assert any(line.startswith("audit trail:") for line in lines), lines  # it really ran


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_data_heart_without_the_data_writes_nothing(tmp_path: Path) -> None:
    """A missing centre file is one line and exit 2, and no half-written folder is left."""
    out = _run("data", "heart", "--out", str(tmp_path / "csv"), "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "csv").exists()


def test_cross_baselines_are_on_by_default_and_never_with_dp_or_secagg() -> None:
    """--no-cross-baselines turns the option off; DP or secure aggregation always do."""
    import dataclasses

    from medimesh.cli import _config, build_parser
    from medimesh.privacy import PrivacyConfig
    from medimesh.secagg import SecAggConfig

    p = build_parser()
    cfg = _config(p.parse_args(["demo"]))
    assert cfg.cross_baselines and cfg.cross_baselines_active
    off = _config(p.parse_args(["demo", "--no-cross-baselines"]))
    assert not off.cross_baselines and not off.cross_baselines_active
    dp = dataclasses.replace(cfg, privacy=PrivacyConfig(epsilon=1.0, delta=1e-3, rounds=3))
    sa = dataclasses.replace(cfg, secure_aggregation=SecAggConfig())
    assert dp.cross_baselines and not dp.cross_baselines_active
    assert sa.cross_baselines and not sa.cross_baselines_active


def test_serve_can_pin_a_run() -> None:
    """`medimesh serve --run ID` pins the run; without it the oracle follows the newest."""
    p = build_parser()
    assert p.parse_args(["serve", "--run", "20261129-1612-ab12"]).run == "20261129-1612-ab12"
    assert p.parse_args(["serve"]).run is None
