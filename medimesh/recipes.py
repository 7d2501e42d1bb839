"""Per-dataset training recipes: the local-training and server settings a consortium declares.

One place for them, so ``medimesh train``/``demo``/``bench`` and the benchmarks that sweep seeds
run exactly the same recipe. Explicit flags always win over a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from medimesh.model import TrainConfig

__all__ = ["Recipe", "recipe"]


@dataclass(frozen=True, slots=True)
class Recipe:
    train: TrainConfig
    server_momentum: float | None = None  # None: the server optimizer's own default


def recipe(dataset: str) -> Recipe:
    """Heart: 2 local steps, L2 0.07 (the pooled scikit-learn optimum, C = 0.03 on 486 rows),
    server momentum 0.5. Switzerland has 30 training rows against Cleveland's 199; with 10
    local steps the example-weighted mean drifted to 0.81 mean-of-centres top-1, below pooled
    (0.83), and momentum 0.8 made FedAvgM oscillate. Sparse: 10 local steps — 77 classes over
    2,000 binary columns learn slowly, and with 5 steps 2 of 10 seeds ended 30 rounds at 0.975
    of pooled top-1 (10 steps: 0.990-0.998 on the same seeds, in-process replica). Rare: L2
    3e-4 and 10 local steps — with 5, 20 rounds left the federated model short of the
    converged pooled one on rare findings (symptom-only ECE 0.067-0.077 vs pooled
    0.030-0.037, disease patients called "Other" 0.102-0.115, seeds 0-2); with 10: ECE
    0.025-0.038, called Other 0.079-0.093 (docs/cohort.md, "Clinical metrics"). Everything
    else: the model defaults."""
    if dataset == "heart":
        return Recipe(TrainConfig(epochs=2, l2=0.07), server_momentum=0.5)
    if dataset == "sparse":
        return Recipe(TrainConfig(epochs=10))
    if dataset == "rare":
        return Recipe(TrainConfig(epochs=10, l2=3e-4))
    return Recipe(TrainConfig())
