"""Runs: every training run has an id, and everything it writes is stored under it.

Why: one database (the demo's ``.medimesh/pg``) outlives runs. Without an id, a second run's
rounds mix with the first's and the oracle cannot tell which model is "the" model. An id is
readable and sorts by start time: ``20261129-1612-ab12`` (UTC date and minute, then four random
hex digits, so two runs started in the same minute still differ). Pure: no I/O here.
"""

from __future__ import annotations

import re
import secrets
import time

__all__ = ["RUN_ID_PATTERN", "UNNAMED_RUN", "is_run_id", "new_run_id"]

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""What the store and the API accept as a run id (new ids are narrower: see new_run_id)."""

UNNAMED_RUN = "unnamed"
"""The run of rows written without a run id: stored before runs had ids, or by a tool (the
oracle benchmark) that publishes a model without running a federation."""

_RUN_ID = re.compile(RUN_ID_PATTERN)


def new_run_id(now: float | None = None, token: str | None = None) -> str:
    """A fresh run id: ``YYYYMMDD-HHMM-xxxx`` (UTC) with four random hex digits."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{token if token is not None else secrets.token_hex(2)}"


def is_run_id(text: str) -> bool:
    """Whether ``text`` is an acceptable run id (letters, digits, ``.``, ``_``, ``-``; ≤ 64)."""
    return bool(_RUN_ID.fullmatch(text))
