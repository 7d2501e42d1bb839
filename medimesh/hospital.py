"""A hospital's protocol logic: local statistics, local training, local evaluation.

Inputs are decoded protocol messages; outputs are the messages to send back. Patient rows stay
in this object, which lives only inside the hospital's own actor. What leaves is aggregates
(setup statistics, evaluation counts) and model deltas.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from medimesh.cross_baselines import score_isolated
from medimesh.errors import ConfigError
from medimesh.explain import count_findings, finding_histogram, symptom_mask
from medimesh.features import Standardizer, combine_stats, local_stats, log_transform
from medimesh.model import (
    Model,
    TrainConfig,
    cross_entropy,
    init_model,
    model_hash,
    predict_proba,
    smoothness,
    topk_correct,
    train_local,
)
from medimesh.policy import HospitalPolicy
from medimesh.protocol import (
    CrossEvalReport,
    EvalReport,
    IsolatedModel,
    ModelPublished,
    RoundStart,
    SetupRequest,
    SetupResult,
    SetupStats,
    Update,
)
from medimesh.sites import DatasetInfo, LocalData

__all__ = ["ISOLATED_STEPS", "HospitalNode", "clip_delta"]

ISOLATED_STEPS = 300


def clip_delta(dw: np.ndarray, db: np.ndarray, max_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale (dw, db) down to L2 norm ``max_norm`` if larger; 0 disables clipping."""
    if max_norm <= 0:
        return dw, db
    norm = float(np.sqrt((dw**2).sum() + (db**2).sum()))
    if norm <= max_norm:
        return dw, db
    scale = max_norm / norm
    return dw * scale, db * scale


class HospitalNode:
    """Holds one site's rows and answers the coordinator's requests."""

    def __init__(self, data: LocalData, info: DatasetInfo) -> None:
        self.name = data.name
        self._info = info
        self._x_train_raw = log_transform(data.x_train, info.log_mask)
        self._x_test_raw = log_transform(data.x_test, info.log_mask)
        self._y_train = data.y_train
        self._y_test = data.y_test
        self._x_train: np.ndarray | None = None
        self._x_test: np.ndarray | None = None
        self._spec_hash = ""
        self._curvature: float | None = None
        self._isolated: IsolatedModel | None = None  # own model + own scaling, after setup
        # The hospital's own limits (medimesh.policy); None = answer as asked (tests, tools).
        self.policy: HospitalPolicy | None = None

    @property
    def n_train(self) -> int:
        return len(self._y_train)

    @property
    def n_test(self) -> int:
        return len(self._y_test)

    @property
    def ready(self) -> bool:
        return self._x_train is not None

    def on_setup_request(self, msg: SetupRequest) -> SetupStats:
        k = len(self._info.class_names)
        if msg.n_features != self._x_train_raw.shape[1] or msg.n_classes != k:
            raise ConfigError(
                f"{self.name}: consortium expects {msg.n_features} features / {msg.n_classes} "
                f"classes, this site has {self._x_train_raw.shape[1]} / {k}"
            )
        self._spec_hash = msg.spec_hash
        s = local_stats(self._x_train_raw, self._y_train, k)
        # Without test rows the isolated model is only needed if peers are to score it.
        top1, top3 = (
            self.isolated_baseline() if self.n_test or msg.cross_baselines
            else (float("nan"), float("nan"))
        )
        return SetupStats(
            msg.spec_hash, s.n_examples, s.count, s.total, s.total_sq, s.class_counts,
            top1, top3, self.n_test, self.finding_histogram(),
        )

    def finding_histogram(self) -> np.ndarray | None:
        """Training rows per bin of recorded symptoms; None without symptom columns."""
        mask = symptom_mask(self._info.feature_names)
        if not mask.any():
            return None
        return finding_histogram(count_findings(self._x_train_raw, mask))

    def isolated_baseline(self, steps: int = ISOLATED_STEPS) -> tuple[float, float]:
        """Top-1/top-3 on this site's test rows of a model trained on this site alone.

        What the hospital could reach without the consortium; the dashboard draws it as a
        reference line. NaN when the site has no test rows.
        """
        if self.n_train == 0:
            return float("nan"), float("nan")
        k = len(self._info.class_names)
        own, prior = combine_stats([local_stats(self._x_train_raw, self._y_train, k)])
        mask = self._info.scale_mask
        std = Standardizer(np.where(mask, own.mean, 0.0), np.where(mask, own.std, 1.0))
        x_train = std.apply(self._x_train_raw).astype(np.float32)
        x_test = std.apply(self._x_test_raw).astype(np.float32)
        model = train_local(
            init_model(x_train.shape[1], k, prior), x_train, self._y_train,
            TrainConfig(epochs=steps),
        )
        self._isolated = IsolatedModel(
            self._spec_hash, model.weights.astype(np.float32), model.bias.astype(np.float32),
            std.mean.astype(np.float64), std.std.astype(np.float64),
        )
        if self.n_test == 0:
            return float("nan"), float("nan")
        proba = predict_proba(model, x_test)
        return (
            topk_correct(proba, self._y_test, 1) / self.n_test,
            topk_correct(proba, self._y_test, 3) / self.n_test,
        )

    def isolated_model(self) -> IsolatedModel | None:
        """The isolated model trained at setup (None before setup or without training rows):
        what this site seals to its peers when the consortium asks for cross-site baselines."""
        return self._isolated

    def on_isolated_model(self, source: str, msg: IsolatedModel) -> CrossEvalReport:
        """Score a peer's isolated model on this site's test patients; counts only leave."""
        if self._spec_hash and msg.spec_hash != self._spec_hash:
            raise ConfigError(f"{self.name}: isolated model from another data model")
        n, top1, top3 = score_isolated(
            msg, self._x_test_raw, self._y_test, len(self._info.class_names)
        )
        return CrossEvalReport(msg.spec_hash, source, n, top1, top3)

    def on_setup_result(self, msg: SetupResult) -> None:
        mask = self._info.scale_mask
        std = Standardizer(
            mean=np.where(mask, msg.mean, 0.0), std=np.where(mask, msg.std, 1.0)
        )
        # float32 rows: training and evaluation cost half of float64, accuracy is unchanged.
        self._x_train = std.apply(self._x_train_raw).astype(np.float32)
        self._x_test = std.apply(self._x_test_raw).astype(np.float32)
        self._curvature = smoothness(self._x_train)

    def _prepared(self) -> tuple[np.ndarray, np.ndarray]:
        if self._x_train is None or self._x_test is None:
            raise ConfigError(f"{self.name}: setup round has not completed")
        return self._x_train, self._x_test

    def on_round_start(self, msg: RoundStart, sender: str = "") -> Update:
        """Evaluate the base model (the last published one), then train on top of it.

        With a policy, ``sender`` (the coordinator's key) is checked first: a refused round
        raises PolicyRefused, a repeated one returns the update already sent for it.
        """
        if self.policy is not None:
            repeated = self.policy.admit_round(msg, sender)
            if repeated is not None:
                return repeated
        x_train, _ = self._prepared()
        report = self.on_model(self.base_as_published(msg), round_base=True)
        base = Model(msg.weights, msg.bias)
        if msg.dp_mode:
            # DP round: one clipped full-batch gradient; per-example gradients stay here.
            from medimesh.privacy import dp_client_delta

            if msg.dp_mode not in ("central", "local"):
                raise ConfigError(f"{self.name}: unknown DP mode {msg.dp_mode!r}")
            mode: Literal["central", "local"] = "local" if msg.dp_mode == "local" else "central"
            dw, db = dp_client_delta(
                base, x_train, self._y_train, msg.clip_norm, mode, msg.dp_noise_multiplier
            )
        else:
            cfg = TrainConfig(msg.epochs, msg.lr, msg.l2, msg.prox_mu, msg.clip_norm)
            local = train_local(base, x_train, self._y_train, cfg, self._curvature)
            dw, db = clip_delta(
                local.weights - base.weights, local.bias - base.bias, msg.clip_norm
            )
        update = Update(
            round=msg.round,
            base_hash=msg.base_hash,
            n_examples=self.n_train,
            delta_w=dw.astype(np.float32),
            delta_b=db.astype(np.float32),
            eval={
                "n_examples": report.n_examples,
                "correct_top1": report.correct_top1,
                "correct_top3": report.correct_top3,
                "loss_sum": report.loss_sum,
            },
        )
        if self.policy is not None:
            self.policy.record_round(msg, sender, update)
        return update

    @staticmethod
    def base_as_published(msg: RoundStart) -> ModelPublished:
        """A round's base model is the previous round's published model: evaluate it too."""
        return ModelPublished(
            msg.round - 1, msg.base_hash, "", msg.weights, msg.bias, (), ()
        )

    def on_model(self, msg: ModelPublished, *, round_base: bool = False) -> EvalReport:
        """Score a published model on this site's test patients (counts only). ``round_base``:
        it is the base of a fresh round being trained (outside the evaluation window)."""
        _, x_test = self._prepared()
        model = Model(msg.weights, msg.bias)
        if model_hash(model) != msg.model_hash:
            raise ConfigError(f"{self.name}: published model does not match its hash")
        if self.policy is not None:  # the evaluation budget; a model scored before: its counts
            cached = self.policy.admit_evaluation(msg.model_hash, msg.round,
                                                  round_base=round_base)
            if cached is not None:
                return dataclasses.replace(cached, round=msg.round)
        proba = predict_proba(model, x_test)
        report = EvalReport(
            round=msg.round,
            model_hash=msg.model_hash,
            n_examples=self.n_test,
            correct_top1=topk_correct(proba, self._y_test, 1),
            correct_top3=topk_correct(proba, self._y_test, 3),
            loss_sum=cross_entropy(proba, self._y_test),
        )
        if self.policy is not None:
            self.policy.record_evaluation(report, round_base=round_base)
        return report
