"""Where a hospital keeps its policy state: one JSON file in its own state directory.

The I/O half of :mod:`medimesh.policy` (which is pure). A hospital writes the file before it
sends the answer the file accounts for (write-ahead), atomically (temporary file, fsync,
rename), so a crash never leaves a spend recorded as smaller than what was released. Its own
``policy.toml`` lives in the same directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["POLICY_FILE", "STATE_FILE", "load_policy_text", "load_state", "save_state"]

STATE_FILE = "policy_state.json"
POLICY_FILE = "policy.toml"


def load_state(state_dir: str | Path) -> str | None:
    """The saved state's text, or None if there is none yet."""
    path = Path(state_dir) / STATE_FILE
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def save_state(state_dir: str | Path, text: str) -> None:
    """Replace the saved state atomically (readable by the hospital's own user only)."""
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = directory / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)


def load_policy_text(state_dir: str | Path) -> str | None:
    """The hospital's own ``policy.toml`` in its state directory, if it has one."""
    path = Path(state_dir) / POLICY_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None
