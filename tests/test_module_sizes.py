"""Issue 16: every role's logic lives in ``medimesh/``; no module under ``actors/`` (the thin
Ray and Serve shells) exceeds 300 lines."""

from __future__ import annotations

from pathlib import Path

ACTORS = Path(__file__).resolve().parent.parent / "actors"
MAX_LINES = 300


def _oversized() -> dict[str, int]:
    sizes = {
        p.name: len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted(ACTORS.glob("*.py"))
    }
    return {name: n for name, n in sizes.items() if n > MAX_LINES}


def _report(over: dict[str, int]) -> str:
    listed = ", ".join(f"{name} ({n} lines)" for name, n in sorted(over.items()))
    return f"actors/ modules over {MAX_LINES} lines: {listed}"


def test_actor_modules_are_at_most_300_lines() -> None:
    """Every actors/*.py module, the composition root (runtime.py) included, has at most 300
    lines."""
    assert ACTORS.is_dir() and (ACTORS / "runtime.py").is_file()
    over = _oversized()
    assert not over, _report(over)
