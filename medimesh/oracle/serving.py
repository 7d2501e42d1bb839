"""Which model the oracle may serve, and how it is read: the decisions, without I/O.

- :func:`cohort_spec` — the feature columns and class names a stored model is read with, taken
  from the model itself (N + 1 classes: the ``--diseases N`` panel), so its engine, its
  vouching (the release hash covers the spec) and ``/vocabulary`` all use the model's own spec.
- :func:`check_servable` and :func:`voucher_for` — only a vouched-for model is served
  (medimesh.release): a signed ``model_published`` entry by a roster coordinator whose release
  hash covers these weights, this standardization and this spec.
- :func:`engine_from` — the immutable :class:`DiagnosisEngine` for a stored model and the setup
  round's statistics; :class:`Served` — the engine, its run and its voucher, swapped in one
  assignment.
- :class:`RefusalLog` — the newest refused model, and when a refusal has lasted long enough to
  log (a new round's model row can reach the store a moment before its entry).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medimesh.audit import AuditEntry
from medimesh.data import cohort
from medimesh.data.cohort import FeatureInfo
from medimesh.diagnosis import DiagnosisEngine, saved_model_for
from medimesh.explain import TrainingProfile
from medimesh.identity import Member
from medimesh.model import model_hash as hash_model
from medimesh.release import UnvouchedModel, Voucher, find_voucher, roster_keys, spec_digest
from medimesh.store import StoredModel, StoreError

__all__ = [
    "REFUSAL_LOG_AFTER_S",
    "RefusalLog",
    "Served",
    "check_servable",
    "cohort_spec",
    "engine_from",
    "voucher_for",
]

REFUSAL_LOG_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class Served:
    """What answers requests right now: one engine (one model) and the run it belongs to."""

    engine: DiagnosisEngine
    run_id: str
    voucher: Voucher | None = None  # the signed model_published entry that vouches for it


def cohort_spec(n_classes: int) -> tuple[tuple[FeatureInfo, ...], tuple[str, ...]]:
    """The feature columns and class names a cohort model with ``n_classes`` outputs is read
    with: a rare cohort with a larger panel (``--diseases N``) has N + 1 classes and its own
    columns; anything else, the ten-disease panel's. ValueError: no panel has that size."""
    n_diseases = n_classes - 1 if n_classes > cohort.N_CLASSES else cohort.PANEL_SIZE
    return cohort.features(n_diseases), cohort.class_names(n_diseases)


def engine_from(stored: StoredModel, state: Mapping[str, Any]) -> DiagnosisEngine:
    """Join a stored model with the setup round's statistics (kept in the checkpoint)."""
    if "mean" not in state or "std" not in state:
        raise StoreError("latest checkpoint has no standardization (mean/std)")
    model = stored.to_model()
    feats, classes = cohort_spec(model.n_classes)
    saved = saved_model_for(
        model,
        feats,
        classes,
        np.asarray(state["mean"], dtype=float),
        np.asarray(state["std"], dtype=float),
        round_=stored.round,
    )
    return DiagnosisEngine(saved, feats, profile=TrainingProfile.from_state(state))


def check_servable(latest: StoredModel, state: Mapping[str, Any]) -> None:
    """What needs no audit entry to refuse: a checkpoint without the standardization, or
    stored weights that do not hash to the model's name (UnvouchedModel)."""
    if "mean" not in state or "std" not in state:
        raise UnvouchedModel("the checkpoint has no standardization (mean/std)")
    if hash_model(latest.to_model()) != latest.model_hash:
        raise UnvouchedModel(f"the stored weights of {latest.model_hash[:12]}… do not hash "
                             "to its name (edited in the database)")


def voucher_for(
    latest: StoredModel,
    state: Mapping[str, Any],
    run: str,
    members: Iterable[Member],
    entries: Iterable[AuditEntry],
) -> Voucher:
    """The signed model_published entry (among ``entries``) for this model as it would serve:
    its weights, the checkpoint's mean/std and its own feature spec, from a coordinator among
    ``members``; else UnvouchedModel."""
    model = latest.to_model()
    try:
        feats, classes = cohort_spec(model.n_classes)
    except ValueError as exc:
        raise UnvouchedModel(f"no feature spec reads a model with {model.n_classes} classes: "
                             f"{exc}") from None
    coordinators, signers = roster_keys(members)
    return find_voucher(
        entries,
        model=model,
        mean=np.asarray(state["mean"], dtype=float),
        std=np.asarray(state["std"], dtype=float),
        spec_hash=spec_digest([f.name for f in feats], classes),
        run_id=run,
        coordinators=coordinators,
        signers=signers,
    )


class RefusalLog:
    """The newest model refused (None: the served one is the newest) and whether to log it.

    A refusal is logged once it has lasted ``log_after`` seconds unchanged; the clock is an
    argument.
    """

    def __init__(self, log_after: float = REFUSAL_LOG_AFTER_S) -> None:
        self.log_after = log_after
        self.current: dict[str, Any] | None = None
        self._since, self._logged = 0.0, False

    def refuse(self, model_hash: str, round_: int, run: str, reason: str, now: float) -> bool:
        """Record a refusal; True exactly once per refusal, when it is time to log it."""
        refused = {"model_hash": model_hash, "round": round_, "run_id": run, "reason": reason}
        if refused != self.current:
            self._since, self._logged = now, False
        self.current = refused
        if not self._logged and now - self._since >= self.log_after:
            self._logged = True
            return True
        return False

    def clear(self) -> None:
        """A model was served: nothing newer is refused."""
        self.current = None
