"""Issue 16: every role's logic lives in ``medimesh/``; no module under ``actors/`` (the thin
Ray and Serve shells) exceeds 300 lines."""

from __future__ import annotations

from pathlib import Path

import pytest

ACTORS = Path(__file__).resolve().parent.parent / "actors"
MAX_LINES = 300
# Being split by other engineers in issue 16; the lead removes this exemption at merge.
PENDING = frozenset({"coordinator.py", "auditor.py", "runtime.py"})


def _oversized(names: set[str] | frozenset[str] | None = None) -> dict[str, int]:
    sizes = {
        p.name: len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted(ACTORS.glob("*.py"))
        if names is None or p.name in names
    }
    return {name: n for name, n in sizes.items() if n > MAX_LINES}


def _report(over: dict[str, int]) -> str:
    listed = ", ".join(f"{name} ({n} lines)" for name, n in sorted(over.items()))
    return f"actors/ modules over {MAX_LINES} lines: {listed}"


def test_actor_modules_are_at_most_300_lines() -> None:
    """Every actors/*.py module but the three still being split has at most 300 lines."""
    assert ACTORS.is_dir() and any(ACTORS.glob("*.py"))
    over = {k: v for k, v in _oversized().items() if k not in PENDING}
    assert not over, _report(over)


@pytest.mark.xfail(
    strict=False,
    reason="actors/coordinator.py, auditor.py and runtime.py are being split (issue 16)",
)
def test_coordinator_auditor_and_runtime_are_at_most_300_lines() -> None:
    """The three shells being split in issue 16 have at most 300 lines, too."""
    assert all((ACTORS / name).is_file() for name in PENDING)
    over = _oversized(PENDING)
    assert not over, _report(over)
