"""The hospital actor: a thin Ray shell over :class:`medimesh.roles.hospital.HospitalRole`.

It builds its own patients from a descriptor (inside its own process; no row ever leaves),
feeds the role every envelope that arrives and carries out the effects the role returns, in
order: seal and send through its transport, or record in its audit outbox. The production
hospital is honest; dishonest ones for tests and benchmarks wrap the role from outside
(medimesh.roles.adversarial, actors/adversary_hospital.py).
"""

from __future__ import annotations

from typing import Any

import ray
import structlog

from medimesh.actors.base import Node
from medimesh.errors import ConfigError
from medimesh.policy import PolicyConfig
from medimesh.roles import Effect, Record, Send, SendRaw
from medimesh.roles.hospital import HospitalRole
from medimesh.sites import DatasetInfo, LocalData, SiteDescriptor, dataset_info, load_site
from medimesh.witness_log import WitnessLog

__all__ = ["Hospital"]

log = structlog.get_logger("medimesh.hospital")

_WARN = frozenset({"policy_refused", "secagg_refused", "message_failed"})


class Hospital(Node):
    """Answers setup, round and model messages from the coordinator, and nobody else."""

    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        router: Any,
        auditor: Any,
        descriptor: SiteDescriptor,
        behaviour: str = "honest",
        *wrapper_args: Any,
        cross_baselines: bool = True,
        policy: PolicyConfig | None = None,
        state_dir: str | None = None,
        secure_aggregation: bool = False,
        witness_dir: str | None = None,
    ) -> None:
        """``cross_baselines`` is this site's own policy: whether it may send its isolated
        model to its peer hospitals when the coordinator asks (medimesh.cross_baselines).
        ``policy``: its own limits from the run it was started with, overridden by a
        ``policy.toml`` in ``state_dir``, where its policy state is also kept
        (medimesh.policy, docs/privacy.md §6).
        ``secure_aggregation``: this site answers only secure rounds, under its own
        SecAggPolicy (medimesh.secagg_policy), whatever a RoundStart asks.
        ``witness_dir``: this site's own state directory for the audit writer's signed chain
        heads (``heads.jsonl``, medimesh.witness); None keeps none.
        ``behaviour``: only "honest" is accepted here (the runtime starts
        actors/adversary_hospital.py's AttackingHospital for any other); ``wrapper_args``
        (positional, after it) are for such a subclass's role and ignored here."""
        self._check_behaviour(behaviour)
        super().__init__(seed, roster_json, router, auditor)
        data = load_site(descriptor)  # built here, inside the hospital's own process
        try:
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # not inside a Ray actor (a plain-class test): a first start
            restarted = False
        self.role = self._make_role(
            data, dataset_info(descriptor.kind, descriptor.params), behaviour, wrapper_args,
            policy=policy or PolicyConfig(), state_dir=state_dir,
            restarted=restarted, cross_baselines=cross_baselines,
            secure_aggregation=secure_aggregation,
            witness=WitnessLog(witness_dir, self.roster) if witness_dir else None,
        )

    @staticmethod
    def _check_behaviour(behaviour: str) -> None:
        if behaviour != "honest":
            raise ConfigError(
                f"behaviour {behaviour!r}: the production hospital is honest "
                "(dishonest sites run medimesh.actors.adversary_hospital.AttackingHospital)"
            )

    def _make_role(
        self, data: LocalData, info: DatasetInfo, behaviour: str,
        wrapper_args: tuple[Any, ...], **options: Any,
    ) -> HospitalRole:
        """The role this shell drives (a subclass shell may build a wrapped one)."""
        return HospitalRole(self.identity, self.roster, data, info, **options)

    @property
    def rounds_trained(self) -> int:
        return self.role.rounds_trained

    def info(self) -> dict[str, Any]:
        """Counts only: what the runtime and /network may know about this site."""
        return self.role.info()

    def deliver(self, envelope: bytes) -> None:
        for error in self.transport.failures():
            self.audit.record("send_failed", -1, "", {"error": error})
        self.carry_out(self.role.receive(envelope))
        self.maybe_flush()

    def carry_out(self, effects: list[Effect]) -> None:
        """Do what the role decided, in order."""
        for effect in effects:
            if isinstance(effect, Send):
                if effect.wait:
                    self.send(effect.msg, list(effect.to), effect.round)
                else:
                    self.post(effect.msg, list(effect.to), effect.round)
            elif isinstance(effect, SendRaw):
                self.transport.post(effect.envelope)
            elif isinstance(effect, Record):
                if effect.event in _WARN:
                    log.warning("request not answered", kind=effect.event, round=effect.round)
                self.audit.record(effect.event, effect.round, effect.subject, dict(effect.body))
