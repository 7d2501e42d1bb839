"""Column names that keep "unknown" apart from "absent" (issue 14), shared by every encoder.

A finding has three states and a linear model needs to see all three:

* a symptom is OBSERVED (its own column ``HP:…`` = 1), EXCLUDED (``excluded:HP:…`` = 1: the
  clinician checked and it is absent) or NOT MENTIONED (both 0: no evidence either way);
* a lab value is a number plus ``measured:<name>`` (1 = measured; 0 = not measured, and the
  value is then imputed with the training mean, never read as "normal");
* genes are ``gene:SYMBOL`` findings plus ``genetic_testing_done`` (0 = not sequenced, which is
  not the same as "sequenced, nothing found").

The cohort generator (:mod:`medimesh.data.cohort`), the CSV feature spec (:mod:`medimesh.spec`)
and the oracle's encoder (:mod:`medimesh.diagnosis`) all build their column names here, so a
name means the same thing wherever it appears (and reads well in an explanation).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EXCLUDED_PREFIX",
    "GENETIC_TESTING_COLUMN",
    "MEASURED_PREFIX",
    "excluded_column",
    "measured_column",
]

EXCLUDED_PREFIX: Final = "excluded:"
MEASURED_PREFIX: Final = "measured:"
GENETIC_TESTING_COLUMN: Final = "genetic_testing_done"


def excluded_column(code: str) -> str:
    """Indicator for "``code`` was checked and found absent", e.g. ``excluded:HP:0001250``."""
    return f"{EXCLUDED_PREFIX}{code}"


def measured_column(name: str) -> str:
    """Indicator column for "``name`` was measured", e.g. ``measured:lyso_gb3``."""
    return f"{MEASURED_PREFIX}{name}"
