"""The command line refuses bad input with one clear line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medimesh.cli import build_parser

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
