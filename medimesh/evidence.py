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

from collections.abc import Sequence
from typing import Final

import numpy as np

__all__ = [
    "EXCLUDED_PREFIX",
    "GENETIC_TESTING_COLUMN",
    "GENE_PREFIX",
    "MEASURED_PREFIX",
    "excluded_column",
    "measured_column",
    "symptoms_only",
]

EXCLUDED_PREFIX: Final = "excluded:"
MEASURED_PREFIX: Final = "measured:"
GENETIC_TESTING_COLUMN: Final = "genetic_testing_done"
GENE_PREFIX: Final = "gene:"


def excluded_column(code: str) -> str:
    """Indicator for "``code`` was checked and found absent", e.g. ``excluded:HP:0001250``."""
    return f"{EXCLUDED_PREFIX}{code}"


def measured_column(name: str) -> str:
    """Indicator column for "``name`` was measured", e.g. ``measured:lyso_gb3``."""
    return f"{MEASURED_PREFIX}{name}"


def symptoms_only(x: np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
    """The same patients with labs and genetics removed, as at a first referral (a copy).

    Every value column with a ``measured:`` companion becomes NaN (not measured) and the
    companion 0; ``gene:`` findings and ``genetic_testing_done`` become 0 (not sequenced).
    Symptoms (observed and excluded), age and sex are kept.
    """
    out = np.array(x, dtype=np.float64, copy=True)
    index = {n: j for j, n in enumerate(feature_names)}
    for name, j in index.items():
        if name.startswith(MEASURED_PREFIX):
            out[:, j] = 0.0
            value = index.get(name.removeprefix(MEASURED_PREFIX))
            if value is not None:
                out[:, value] = np.nan
        elif name.startswith(GENE_PREFIX) or name == GENETIC_TESTING_COLUMN:
            out[:, j] = 0.0
    return out
