"""What a coordinator is configured with: model shape, rules, quorum, timing, privacy.

:class:`CoordinatorConfig` is the coordinator role's configuration (medimesh.roles.coordinator);
``medimesh.actors.coordinator`` re-exports it under its old import path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medimesh.aggregation import DEFAULT as DEFAULT_AGGREGATOR
from medimesh.aggregation import make_aggregator
from medimesh.errors import ConfigError
from medimesh.model import TrainConfig
from medimesh.privacy import PrivacyConfig
from medimesh.runs import UNNAMED_RUN
from medimesh.secagg import SecAggConfig
from medimesh.server_opt import (
    DEFAULT_BETA2,
    DEFAULT_TAU,
    FedAvgM,
    ServerOpt,
    make_server_optimizer,
)

__all__ = [
    "CROSS_BASELINES_WAIT_S",
    "STATISTICAL_REASONS",
    "VERDICT_GRACE_S",
    "CoordinatorConfig",
]

# Verdict reasons from the validator's cross-update scoring (not protocol refusals).
STATISTICAL_REASONS = frozenset(
    {"norm_outlier", "free_rider", "near_duplicate", "opposes_others", "quarantined"}
)
VERDICT_GRACE_S = 2.0  # how long a round waits for verdicts it asked the validator for again
CROSS_BASELINES_WAIT_S = 10.0  # how long setup waits for peers' cross-site scores


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    n_features: int
    n_classes: int
    spec_hash: str
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregator: str = DEFAULT_AGGREGATOR
    n_byzantine: int = 0
    # Server optimizer (medimesh.server_opt): lr and momentum (β1) None = the rule's default.
    server_optimizer: str = "fedavgm"
    server_lr: float | None = None
    server_momentum: float | None = None
    server_beta2: float = DEFAULT_BETA2
    server_tau: float = DEFAULT_TAU
    min_updates: int = 1
    round_timeout_s: float = 30.0
    eval_timeout_s: float = 10.0
    setup_timeout_s: float = 60.0
    pace_s: float = 0.0  # pause between rounds so people can watch a demo train
    privacy: PrivacyConfig | None = None  # DP-FedAvg (docs/privacy.md); None = no DP
    round_retries: int = 3  # runs of a round that missed quorum (lost messages, restarts)
    retry_window_s: float = 30.0  # ...and keep retrying for at least this long
    # Secure aggregation (docs/privacy.md §4): the coordinator is the SecAgg server and learns
    # only the weighted sum of the deltas; None = plaintext updates.
    secure_aggregation: SecAggConfig | None = None
    run_id: str = UNNAMED_RUN  # the run this coordinator drives (medimesh.runs)
    # Ask hospitals for cross-site baselines at setup (medimesh.cross_baselines); the runtime
    # turns it off under DP and secure aggregation.
    cross_baselines: bool = False
    # The consortium's cap on one site's rows (training + test), on top of the relative rule
    # of medimesh.setup_checks; None = the relative rule only.
    max_site_examples: int | None = None

    def __post_init__(self) -> None:
        make_aggregator(self.aggregator, self.n_byzantine)  # unknown names fail here, early
        self.server()  # ...and so do unknown server optimizers and bad values
        if self.min_updates < 1:
            raise ConfigError("min_updates must be at least 1")

    def server(self) -> ServerOpt:
        """The server optimizer this run steps with. DP keeps FedAvgM with its own lr and
        momentum (docs/privacy.md): the step sizes tuned for noisy clipped gradients differ."""
        if self.privacy is not None:
            if self.server_optimizer != "fedavgm":
                raise ConfigError(
                    "differential privacy steps with FedAvgM (its own server lr and momentum); "
                    f"server optimizer {self.server_optimizer!r} is not wired for DP"
                )
            return FedAvgM(self.privacy.server_lr, self.privacy.server_momentum)
        return make_server_optimizer(
            self.server_optimizer, self.server_lr, self.server_momentum,
            self.server_beta2, self.server_tau,
        )
