"""One import namespace: actors and ui are medimesh.actors and medimesh.ui."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_actors_and_ui_import_under_medimesh() -> None:
    """medimesh.actors.* and medimesh.ui resolve to the top-level actors/ and ui/ folders."""
    runtime = importlib.import_module("medimesh.actors.runtime")
    ui = importlib.import_module("medimesh.ui")
    assert Path(runtime.__file__ or "").resolve().parent == (ROOT / "actors").resolve()
    assert Path(ui.__file__ or "").resolve().parent == (ROOT / "ui").resolve()


def test_no_code_imports_actors_or_ui_as_top_level_packages() -> None:
    """`import actors` / `from ui import …` would create a second copy of every module."""
    offenders = []
    for folder in ("medimesh", "actors", "ui", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                if any(n.split(".")[0] in ("actors", "ui") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}")
    assert offenders == []


def test_core_does_not_import_ray() -> None:
    """The functional core stays free of Ray, so it is testable in milliseconds."""
    bad = []
    for path in (ROOT / "medimesh").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "import ray" in text and path.name not in ("cli.py",):
            bad.append(path.name)
    assert bad == []


def test_the_package_lists_its_public_api_without_importing_ray() -> None:
    """dir(medimesh) shows the entry points, each documented; importing medimesh stays cheap."""
    import subprocess
    import sys

    code = (
        "import sys, medimesh; names = dir(medimesh); "
        "assert 'ray' not in sys.modules, 'ray imported'; "
        "assert all(getattr(medimesh, n).__doc__ for n in names if n != '__version__'); "
        "print(','.join(names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    names = set(out.stdout.strip().split(","))
    assert {"Client", "Consortium", "RunConfig", "judge_round", "make_aggregator",
            "MediMeshError", "__version__"} <= names
    assert not {"Any", "importlib", "annotations"} & names
