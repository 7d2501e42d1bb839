"""``medimesh bench codes``: train and evaluate on CSV sites with a large HPO codes spec.

Generates synthetic site tables (hundreds of HPO terms, dozens of classes, a numeric and a
categorical column) with a codes feature expanded to HPO ancestors, then times the real
``medimesh train`` and ``medimesh evaluate`` commands on them, in fresh processes as a user
would run them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medimesh.hpo import HpoAncestors

__all__ = ["make_codes_sites", "run_codes"]


def make_codes_sites(
    out_dir: Path, n_terms: int = 400, n_classes: int = 30, n_sites: int = 4, seed: int = 0,
    rows_per_site: int = 300,
) -> tuple[Path, list[tuple[str, Path]], Path]:
    """Write a spec, one CSV per site and a held-out CSV; returns (spec, sites, external)."""
    hpo = HpoAncestors.load()
    rng = np.random.default_rng(seed)
    # Leaf-ish real terms: those with at least three ancestors, so expansion has work to do.
    candidates = sorted(t for t in hpo if not hpo.is_obsolete(t) and len(hpo.ancestors(t)) >= 3)
    terms = [str(t) for t in rng.choice(candidates, size=n_terms, replace=False)]
    vocabulary = sorted(set(terms) | {a for t in terms[:50] for a in hpo.ancestors(t)})
    classes = [f"disease-{i:02d}" for i in range(n_classes)]
    profiles = [rng.choice(n_terms, size=12, replace=False) for _ in range(n_classes)]
    spec = {
        "label": "diagnosis",
        "classes": classes,
        "features": [
            {"name": "age", "type": "numeric", "missing_values": [-1], "unit": "years"},
            {"name": "sex", "type": "categorical", "levels": ["F", "M"], "drop_first": True},
            {"name": "hpo", "type": "codes", "separator": "|", "vocabulary": vocabulary,
             "expand": "hpo-ancestors"},
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")

    def write(path: Path, n: int, mix: np.ndarray) -> None:
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["patient", "age", "sex", "hpo", "diagnosis"])
            for i in range(n):
                c = int(rng.choice(n_classes, p=mix))
                core = [terms[j] for j in profiles[c] if rng.random() < 0.7]
                noise = [terms[j] for j in rng.choice(n_terms, size=2, replace=False)]
                age = -1 if rng.random() < 0.1 else round(float(rng.normal(30 + c, 8)), 1)
                sex = "M" if rng.random() < 0.5 else "F"
                w.writerow([f"p{i}", age, sex, "|".join(core + noise), classes[c]])

    sites = []
    for s in range(n_sites):
        mix = rng.dirichlet(np.full(n_classes, 0.5))
        path = out_dir / f"site-{s}.csv"
        write(path, rows_per_site, mix)
        sites.append((f"site-{s}", path))
    external = out_dir / "external.csv"
    write(external, rows_per_site, np.full(n_classes, 1.0 / n_classes))
    return spec_path, sites, external


def _medimesh(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "medimesh.cli", *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"medimesh {args[0]} failed: {out.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_codes(cfg: Any, progress: Any = None) -> dict[str, Any]:
    n_terms, n_classes = 400, 30
    with tempfile.TemporaryDirectory(prefix="medimesh-codes-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        spec, sites, external = make_codes_sites(root, n_terms, n_classes, seed=cfg.seed)
        t_gen = time.perf_counter()
        site_args = [a for name, path in sites for a in ("--site", f"{name}={path}")]
        trained = _medimesh(
            "train", "--spec", str(spec), *site_args, "--rounds", str(cfg.rounds),
            "--out", str(root / "model"),
        )
        t_train = time.perf_counter()
        scored = _medimesh("evaluate", "--model", str(root / "model"), "--csv", str(external))
        t_eval = time.perf_counter()
        vocab = json.loads(spec.read_text())["features"][2]["vocabulary"]
    return {
        "benchmark": "codes",
        "hpo_terms_sampled": n_terms,
        "vocabulary_size": len(vocab),
        "classes": n_classes,
        "sites": len(sites),
        "rounds": cfg.rounds,
        "train_wall_s": round(t_train - t_gen, 2),
        "evaluate_wall_s": round(t_eval - t_train, 2),
        "total_wall_s": round(t_eval - t0, 2),
        "final_round_top1": trained["rounds"][-1]["top1"],
        "external": {k: scored[k] for k in ("n", "top1", "top3", "balanced_accuracy", "macro_f1")},
    }
