"""The hospital actor: builds its own patients from a descriptor and never lets a row out.

A hospital may be configured to misbehave (``behaviour``), so that tests and
``medimesh bench byzantine`` can show what the validator and the aggregation rules withstand.
Statistical attacks change the delta it sends; protocol attacks change the envelope.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import ray
import structlog

from medimesh.actors.base import Node, resolve
from medimesh.actors.witness import WitnessLog
from medimesh.adversary import PROTOCOL_ATTACKS, AttackContext, protocol_envelope
from medimesh.aggregation import flatten, unflatten
from medimesh.attacks import ATTACKS, COLLUDING, FRAMING, attack_update, flip_labels
from medimesh.errors import ConfigError, EnvelopeError, MediMeshError
from medimesh.hospital import HospitalNode
from medimesh.policy import HospitalPolicy, PolicyConfig, PolicyRefused
from medimesh.protocol import (
    ChainHead,
    IsolatedModel,
    ModelPublished,
    RoundStart,
    SecAggAdverts,
    SecAggCheckRequest,
    SecAggInbox,
    SecAggUnmaskRequest,
    SetupRequest,
    SetupResult,
    Update,
    decode,
)
from medimesh.secagg_lie import LIAR_SHIFT, lie
from medimesh.secagg_policy import SecAggPolicy, SecAggRefused
from medimesh.secagg_round import SecAggHospital
from medimesh.sites import SiteDescriptor, dataset_info, load_site
from medimesh.wire import open_envelope

__all__ = ["DRILLS", "Hospital"]

# Behaviours that are not attacks but failure drills. "secagg_dropout": in a secure round,
# send the masked update, then vanish (never answer the unmasking request). "secagg_liar":
# add LIAR_SHIFT * C to the first coordinate of its masked input (medimesh.secagg_lie).
DRILLS = frozenset({"secagg_dropout", "secagg_liar"})

log = structlog.get_logger("medimesh.hospital")


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
        colluders: Any = None,
        n_byzantine: int = 0,
        *,
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
        heads (``heads.jsonl``, medimesh.witness); None keeps none."""
        super().__init__(seed, roster_json, router, auditor)
        self._witness = WitnessLog(witness_dir, self.roster) if witness_dir else None
        self._share_isolated = cross_baselines
        known = behaviour in ATTACKS or behaviour in PROTOCOL_ATTACKS or behaviour in DRILLS
        if not known:
            raise ConfigError(f"unknown behaviour {behaviour!r}")
        data = load_site(descriptor)  # built here, inside the hospital's own process
        self._data_notes = {"skipped_rows": data.skipped_rows, "unknown_codes": data.unknown_codes,
                            **data.notes}
        info = dataset_info(descriptor.kind, descriptor.params)
        self._rng = np.random.default_rng(int(self.peer_id[:8], 16))
        if behaviour == "label_flip":
            flipped = flip_labels(data.y_train, len(info.class_names), self._rng)
            data = dataclasses.replace(data, y_train=flipped)
        self._node = HospitalNode(data, info)
        self._state_dir = state_dir
        self._node.policy = self._own_policy(policy or PolicyConfig())
        self._coordinator = self.roster.with_role("coordinator")[0].peer_id
        self._validator = self.roster.with_role("validator")[0].peer_id
        self._behaviour = behaviour
        self._colluders = resolve(colluders)
        self._n_byzantine = n_byzantine
        self._n_hospitals = len(self.roster.with_role("hospital"))
        self._peers = {
            m.peer_id for m in self.roster.with_role("hospital") if m.peer_id != self.peer_id
        }
        self._last_envelope: bytes | None = None
        # Global models seen (first, last) and the last step: what a time-coupled attack uses.
        self._first_base: np.ndarray | None = None
        self._last_base: tuple[str, np.ndarray] | None = None
        self._step: np.ndarray | None = None
        self._secagg = SecAggHospital(
            self.identity, SecAggPolicy.from_roster(self.roster, secure_aggregation)
        )
        self.rounds_trained = 0

    def _own_policy(self, config: PolicyConfig) -> HospitalPolicy:
        """The hospital's policy: its own file over the run's defaults, its saved state, and
        whether a restart lost that state (Ray restarted this actor and no file was kept)."""
        from medimesh import policy_store

        state = None
        if self._state_dir is not None:
            text = policy_store.load_policy_text(self._state_dir)
            if text is not None:
                config = config.with_toml(text)
            state = policy_store.load_state(self._state_dir)
        try:
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:  # not inside a Ray actor (a plain-class test): a first start
            restarted = False
        policy = HospitalPolicy(self.roster, config, self._node.n_train, state,
                                state_lost=restarted and state is None)
        if restarted:
            self.audit.record("hospital_policy_restored", 0, self.peer_id,
                              {**policy.summary(), **config.describe()})
        return policy

    def _policy_saved(self) -> None:
        """Audit the policy's decisions and keep its state on this site's disk (before the
        answer it accounts for is sent)."""
        policy = self._node.policy
        if policy is None:
            return
        for kind, round_, subject, body in policy.drain_events():
            self.audit.record(kind, round_, subject, body)
        if self._state_dir is not None:
            from medimesh.policy_store import save_state

            save_state(self._state_dir, policy.state_json())

    def _misbehave(self, update: Update, start: RoundStart) -> Update:
        """Apply a statistical attack to the honest delta (identity for honest sites)."""
        name, round_ = self._behaviour, start.round
        if name in ("honest", "label_flip") or name in PROTOCOL_ATTACKS or name in DRILLS:
            return update
        honest = flatten(update.delta_w, update.delta_b)
        base = flatten(start.weights, start.bias)
        if self._last_base is not None and self._last_base[0] != start.base_hash:
            self._step = base - self._last_base[1]  # a retried round keeps its step
        self._last_base = (start.base_hash, base)
        if self._first_base is None:
            self._first_base = base
        group: list[np.ndarray] = []
        victim: np.ndarray | None = None
        if self._colluders is not None:
            # The attackers' own side channel (outside MediMesh).
            if name in COLLUDING:
                group = list(ray.get(self._colluders.share.remote(round_, honest)))
            if name in FRAMING:
                victim = ray.get(self._colluders.victim_update.remote(start))
        if name in FRAMING and victim is None:
            return update  # nobody to frame (or the channel failed): send the honest delta
        extra: dict[str, Any] = {}
        if name == "relay":
            extra = {"previous": self._step, "trajectory": base - self._first_base}
        vec = attack_update(
            name,
            honest,
            round_=round_,
            rng=self._rng,
            colluders=group,
            n_clients=self._n_hospitals,
            n_byzantine=max(self._n_byzantine, 1),
            victim=victim,
            **extra,
        )
        dw, db = unflatten(vec, *update.delta_w.shape)
        return dataclasses.replace(
            update, delta_w=dw.astype(np.float32), delta_b=db.astype(np.float32)
        )

    def info(self) -> dict[str, Any]:
        """Counts only: what the runtime and /network may know about this site."""
        return {
            "name": self._node.name,
            "peer_id": self.peer_id,
            "n_train": self._node.n_train,
            "n_test": self._node.n_test,
            "rounds_trained": self.rounds_trained,
            "policy": self._node.policy.summary() if self._node.policy else {},
            **self._data_notes,
        }

    def deliver(self, envelope: bytes) -> None:
        for error in self.transport.failures():
            self.audit.record("send_failed", -1, "", {"error": error})
        try:
            opened = open_envelope(envelope, self.identity)
        except EnvelopeError as exc:
            self.audit.record("envelope_refused", -1, "", {"reason": type(exc).__name__})
            return
        h = opened.header
        if self._witness is not None and h.type == ChainHead.TYPE:
            problem = self._witness.receive(h.sender, opened.payload)
            if problem:
                self.audit.record("chain_head_refused", h.round, h.message_id, {"reason": problem})
            self.maybe_flush()
            return
        from_peer = h.type == IsolatedModel.TYPE and h.sender in self._peers
        if h.sender != self._coordinator and not from_peer:
            self.audit.record("unexpected_sender", h.round, h.message_id, {"type": h.type})
            return
        try:
            if from_peer:
                report = self._node.on_isolated_model(
                    h.sender, decode(h.type, opened.payload, IsolatedModel)
                )
                self.send(report, [self._coordinator], h.round)
            else:
                self._handle(h.type, h.round, opened.payload)
        except PolicyRefused as exc:  # this site's own limits: audited, nothing is sent
            log.warning("request refused by policy", type=h.type, rule=exc.rule)
            self.audit.record("policy_refused", h.round, h.message_id,
                              {**exc.to_audit(), "type": h.type})
        except SecAggRefused as exc:  # its own policy said no: nothing was sent
            log.warning("secure aggregation refused", type=h.type, rule=exc.rule)
            self.audit.record("secagg_refused", h.round, h.message_id,
                              {"type": h.type, **exc.audit_body()})
        except MediMeshError as exc:
            log.warning("message not handled", type=h.type, error=str(exc))
            self.audit.record("message_failed", h.round, h.message_id, {"error": str(exc)})
        self.maybe_flush()

    def _handle(self, type_: str, round_: int, payload: bytes) -> None:
        node = self._node
        if type_ == SetupRequest.TYPE:
            setup = decode(type_, payload, SetupRequest)
            stats = node.on_setup_request(setup)
            self.send(stats, [self._coordinator], 0)
            isolated = node.isolated_model()
            if setup.cross_baselines and self._share_isolated and isolated and self._peers:
                # Sealed to the peer hospitals only (this roster copy's, not the request's).
                self.post(isolated, sorted(self._peers), 0)
        elif type_ == SetupResult.TYPE:
            result = decode(type_, payload, SetupResult)
            node.on_setup_result(result)
            if self._behaviour in FRAMING and self._colluders is not None:
                ray.get(self._colluders.victim_setup.remote(result))  # the side channel

        elif type_ == RoundStart.TYPE:
            start = decode(type_, payload, RoundStart)
            self._secagg.admit(start)  # the site's own SecAgg policy, before any training
            update = self._misbehave(node.on_round_start(start, self._coordinator), start)
            self._policy_saved()
            if start.secagg_threshold:
                # Secure round: the delta stays here until it leaves masked (phase 2).
                self.post(self._secagg.start(start, update), [self._coordinator], round_)
                self.rounds_trained += 1
                return
            recipients = [self._validator, self._coordinator]
            env = self.seal(update, recipients, round_)
            if self._behaviour in PROTOCOL_ATTACKS and round_ >= 2:
                victims = [m.peer_id for m in self.roster.with_role("hospital")]
                ctx = AttackContext(
                    self.identity,
                    recipients,
                    round_,
                    self._last_envelope,
                    next(v for v in victims if v != self.peer_id),
                    int(start.committed.get(self.peer_id, node.n_train)),
                )
                attack = protocol_envelope(self._behaviour, ctx, update)
                self.transport.post(attack)
            else:
                self.transport.post(env)
                self._last_envelope = env  # what a replaying attacker captured last
            self.rounds_trained += 1
        elif type_ == ModelPublished.TYPE:
            report = node.on_model(decode(type_, payload, ModelPublished))
            self._policy_saved()
            self.send(report, [self._coordinator], round_)
        elif type_ == SecAggAdverts.TYPE:
            shares = self._secagg.on_adverts(decode(type_, payload, SecAggAdverts))
            self.post(shares, [self._coordinator], round_)
        elif type_ == SecAggInbox.TYPE:
            masked = self._secagg.on_inbox(decode(type_, payload, SecAggInbox))
            if self._behaviour == "secagg_liar":
                params = self._secagg.params(round_)
                shift = np.zeros(params.dim)
                shift[0] = LIAR_SHIFT * params.quantizer.clip
                masked = lie(masked, self.identity, params, shift)
            self.post(masked, [self._validator, self._coordinator], round_)
        elif type_ == SecAggCheckRequest.TYPE:
            check = self._secagg.on_check_request(decode(type_, payload, SecAggCheckRequest))
            self.post(check, [self._coordinator], round_)
        elif type_ == SecAggUnmaskRequest.TYPE:
            request = decode(type_, payload, SecAggUnmaskRequest)
            if self._behaviour == "secagg_dropout":
                self.audit.record("secagg_dropout_drill", round_, self.peer_id, {})
                return
            self.post(self._secagg.on_unmask_request(request), [self._coordinator], round_)
