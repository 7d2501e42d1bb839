"""The validator actor: the Ray shell around :class:`~medimesh.roles.validator.ValidatorRole`.

The protocol (checks, scoring, batching, signing, resend, what to audit) lives in the role.
This shell feeds it what the router delivers, ticks it from a timer when its deadline passes
(the round's batch goes out shortly before the round's deadline), reads its checkpointed
reputation back from the auditor after a restart, and carries out its effects: sealed bytes
to the router, events to the audit outbox, verdict counts to the metrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

from medimesh.actors import telemetry
from medimesh.actors.base import Node
from medimesh.roles import Record, Send, SendRaw
from medimesh.roles.validator import STATE_EVENT, CountVerdicts, ValidatorEffect, ValidatorRole

__all__ = ["Validator"]

log = structlog.get_logger("medimesh.validator")


class Validator(Node):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        max_norm: float = 50.0,
        scoring: bool = True,
        tolerate: int = 0,
    ) -> None:
        super().__init__(seed, roster_json, router, auditor)
        self.role = ValidatorRole(self.identity, self.roster, max_norm=max_norm,
                                  scoring=scoring, tolerate=tolerate)
        self._timer: threading.Timer | None = None
        self._armed: float | None = None  # the role deadline the timer is set for
        self._lock = threading.RLock()  # the timer thread drives the role too
        with self._lock:
            self._carry(self._restore())

    def deliver(self, envelope: bytes) -> None:
        with self._lock:
            self._carry(self.role.receive(envelope, time.time()))
            self._arm()
            self.maybe_flush()

    def _tick(self) -> None:
        with self._lock:
            self._armed = None  # fired: re-arm even for the same deadline (a timer may be early)
            self._carry(self.role.tick(time.time()))
            self._arm()
            self.maybe_flush()

    def _arm(self) -> None:
        """Keep one timer set for the role's deadline."""
        deadline = self.role.deadline
        if deadline == self._armed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed = None, deadline
        if deadline is not None:
            self._timer = threading.Timer(max(deadline - time.time(), 0.0), self._tick)
            self._timer.daemon = True
            self._timer.start()

    def _carry(self, effects: Sequence[ValidatorEffect]) -> None:
        """Do what the role decided, in order."""
        for e in effects:
            if isinstance(e, SendRaw):
                self.transport.send(e.envelope)
            elif isinstance(e, Send):
                self.send(e.msg, list(e.to), e.round)
            elif isinstance(e, Record):
                self.audit.record(e.event, e.round, e.subject, dict(e.body))
            elif isinstance(e, CountVerdicts):
                telemetry.record_verdicts(e.verdicts)

    def _restore(self) -> list[ValidatorEffect]:
        """After a restart, hand the role this run's checkpointed standing from the trail."""
        import ray

        if self._auditor is None or not ray.get_runtime_context().was_current_actor_reconstructed:
            return []
        try:
            states = ray.get(self._auditor.entries.remote(STATE_EVENT, None, 50), timeout=30)
            starts = ray.get(self._auditor.entries.remote("setup_started", None, 1), timeout=30)
        except Exception as exc:  # the auditor is restarting: start empty, and say so
            log.warning("validator state not restored", error=type(exc).__name__)
            return []
        return self.role.restore(states, starts[-1].seq if starts else 0)

    @property
    def verdicts(self) -> dict[str, int]:
        return self.role.verdicts

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self.role.stats()
