"""Effects only a coordinator returns, beyond Send / SendRaw / Record (medimesh.roles), and
:class:`Wait`, what the coordinator role waits for between two effects.

The shell carries each effect out against the auditor (models, rounds, checkpoints), its
audit outbox, or its caller (the outcome of a setup, a round or a resume).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medimesh.roles import Effect
from medimesh.rounds import RoundMetrics

__all__ = [
    "CoordinatorEffect",
    "Failed",
    "FlushAudit",
    "PublishModel",
    "Refused",
    "Resumed",
    "RoundClosed",
    "SaveCheckpoint",
    "SetupDone",
    "Wait",
]


@dataclass(frozen=True, slots=True)
class FlushAudit:
    """Hand the audit outbox to the auditor now (a round or setup reached a milestone)."""


@dataclass(frozen=True, slots=True)
class PublishModel:
    """Store a global model with its provenance (the auditor's ``record_model``)."""

    model_hash: str
    round: int
    parent_hash: str  # "" for the initial model
    weights: np.ndarray
    bias: np.ndarray
    updates: tuple[str, ...]
    verdicts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SaveCheckpoint:
    """Persist the signed state a restarted coordinator resumes from."""

    round: int
    state: Mapping[str, Any]
    model_hash: str


@dataclass(frozen=True, slots=True)
class RoundClosed:
    """A round's metrics are final (evaluation of its model included): store and report them."""

    metrics: RoundMetrics


@dataclass(frozen=True, slots=True)
class SetupDone:
    """The setup round finished; ``summary`` is what ``setup()`` returns."""

    summary: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Resumed:
    """The coordinator continues from its checkpoint; ``summary`` is what ``resume()`` returns."""

    summary: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Failed:
    """The setup or round missed quorum. ``retry``: the role starts the same round again on the
    next ``begin_round`` (after the shell waited for a restarting transport, if one failed)."""

    reason: str
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    """The checkpoint was refused (edited, foreign or stale): the coordinator stops for good."""

    reason: str


CoordinatorEffect = (
    Effect | FlushAudit | PublishModel | SaveCheckpoint | RoundClosed | SetupDone | Resumed
    | Failed | Refused
)


@dataclass(slots=True)
class Wait:
    """What the role waits for: ``done`` until ``deadline``; then ``then(now)`` moves on.

    With ``enough``: once it holds (a threshold reached), only ``grace_s`` more, so one slow
    or vanished hospital does not stall a phase.
    """

    phase: str
    done: Callable[[], bool]
    deadline: float
    then: Callable[[float], None]
    enough: Callable[[], bool] | None = None
    grace_s: float = 0.0
