"""The README's SDK example runs against a real oracle (uvicorn, real PostgreSQL)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_sdk_example_runs(live_oracle: str) -> None:
    """Every python block in the README executes without error against a live oracle."""
    blocks = _python_blocks()
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"url": live_oracle})
