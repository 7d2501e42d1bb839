"""The hospital role, sans-IO: envelopes in, effects out (Send / SendRaw / Record).

One implementation of what a hospital does, driven by two shells: the Ray actor
(:class:`medimesh.actors.hospital.Hospital`) and the standalone node process. The role opens
each envelope with the site's own key, checks the sender against its own roster copy (the
coordinator; a peer hospital for an isolated model; the audit writer's chain heads go to the
witness log), dispatches, applies the site's own policy (medimesh.policy) and secure-aggregation
policy (medimesh.secagg_policy), and returns what to send and what to audit, in order. It
never sends, and touches no Ray, HTTP or database.

Its only I/O is the site's own state directory (``state_dir``): ``policy.toml`` and the
policy state are read at construction, and the state is written (medimesh.policy_store,
atomically) *before* the effects that answer for it are returned, so a shell that carries
out the effects in order never sends an answer its saved state does not account for. The
witness log, when given, keeps its heads in its own file (medimesh.witness_log).

Extension points for a wrapper (the role itself has one behaviour, the honest one):

* :meth:`HospitalRole.outgoing_update` — the site's trained Update passes through it before
  it is sealed (plain round) or masked (secure round); the role returns it unchanged.
* :meth:`HospitalRole.handle` — a subclass may rewrite the effects it returns, e.g. replace
  the ``Send`` that carries an :class:`~medimesh.protocol.Update` by a ``SendRaw``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from medimesh import policy_store
from medimesh.errors import EnvelopeError, MediMeshError
from medimesh.hospital import HospitalNode
from medimesh.identity import Identity, Roster
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
from medimesh.roles import Effect, Record, Send
from medimesh.secagg import SecAggParams
from medimesh.secagg_policy import SecAggPolicy, SecAggRefused
from medimesh.secagg_round import SecAggHospital
from medimesh.sites import DatasetInfo, LocalData
from medimesh.wire import Opened, open_envelope

__all__ = ["HospitalRole", "WitnessSink"]


class WitnessSink(Protocol):
    """Keeps the audit writer's signed chain heads (medimesh.witness_log.WitnessLog)."""

    def receive(self, sender: str, payload: bytes) -> str:
        """Check and keep one head; why it was refused ("" when kept)."""
        ...


class HospitalRole:
    """One hospital's protocol state machine.

    ``identity``: the site's own key. ``roster``: its own roster copy (who the coordinator,
    validator, auditor and peer hospitals are). ``data`` / ``info``: its rows, already loaded
    (they never leave this object's :class:`~medimesh.hospital.HospitalNode`).
    ``policy``: a ready :class:`HospitalPolicy`, or the run's :class:`PolicyConfig` (None:
    defaults) that ``state_dir/policy.toml`` overrides and whose saved state is restored from
    ``state_dir``. ``restarted``: the shell knows this process was restarted (a lost state is
    then audited and, in local DP mode, refuses every release). ``cross_baselines``: may this
    site seal its isolated model to its peers when asked. ``secure_aggregation``: this site
    answers only secure rounds. ``witness``: where the writer's chain heads are kept (None:
    chain heads are refused as from an unexpected sender).
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        data: LocalData,
        info: DatasetInfo,
        *,
        policy: HospitalPolicy | PolicyConfig | None = None,
        state_dir: str | Path | None = None,
        restarted: bool = False,
        cross_baselines: bool = True,
        secure_aggregation: bool = False,
        witness: WitnessSink | None = None,
    ) -> None:
        self.identity = identity
        self.roster = roster
        self._witness = witness
        self._share_isolated = cross_baselines
        self._state_dir = state_dir
        self._data_notes = {"skipped_rows": data.skipped_rows,
                            "unknown_codes": data.unknown_codes, **data.notes}
        self._node = HospitalNode(data, info)
        self._pending: list[Effect] = []  # effects of construction, returned by the first call
        self._node.policy = (
            policy if isinstance(policy, HospitalPolicy)
            else self._own_policy(policy or PolicyConfig(), restarted)
        )
        self._coordinator = roster.with_role("coordinator")[0].peer_id
        self._validator = roster.with_role("validator")[0].peer_id
        self._peers = frozenset(
            m.peer_id for m in roster.with_role("hospital") if m.peer_id != identity.peer_id
        )
        self._secagg = SecAggHospital(
            identity, SecAggPolicy.from_roster(roster, secure_aggregation)
        )
        self.rounds_trained = 0

    # -- what a shell may read ---------------------------------------------------------------
    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @property
    def coordinator(self) -> str:
        return self._coordinator

    @property
    def validator(self) -> str:
        return self._validator

    @property
    def n_train(self) -> int:
        return self._node.n_train

    @property
    def policy(self) -> HospitalPolicy | None:
        return self._node.policy

    def secagg_params(self, round_: int) -> SecAggParams:
        """The open secure aggregation's parameters for ``round_`` (SecAggError if none)."""
        return self._secagg.params(round_)

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

    # -- input -------------------------------------------------------------------------------
    def receive(self, envelope: bytes) -> list[Effect]:
        """Open ``envelope`` with this site's key and answer it: the effects to carry out."""
        try:
            opened = open_envelope(envelope, self.identity)
        except EnvelopeError as exc:
            return self._drain_pending([Record("envelope_refused", -1, "",
                                               {"reason": type(exc).__name__})])
        return self._drain_pending(self.handle(opened))

    def handle(self, opened: Opened) -> list[Effect]:
        """Answer an envelope already opened (and so authenticated) with this site's key."""
        h = opened.header
        if self._witness is not None and h.type == ChainHead.TYPE:
            problem = self._witness.receive(h.sender, opened.payload)
            if problem:
                return [Record("chain_head_refused", h.round, h.message_id, {"reason": problem})]
            return []
        from_peer = h.type == IsolatedModel.TYPE and h.sender in self._peers
        if h.sender != self._coordinator and not from_peer:
            return [Record("unexpected_sender", h.round, h.message_id, {"type": h.type})]
        try:
            if from_peer:
                msg = decode(h.type, opened.payload, IsolatedModel)
                report = self._node.on_isolated_model(h.sender, msg)
                return [Send(report, (self._coordinator,), h.round, wait=True)]
            return self._dispatch(h.type, h.round, opened.payload)
        except PolicyRefused as exc:  # this site's own limits: audited, nothing is sent
            return [Record("policy_refused", h.round, h.message_id,
                           {**exc.to_audit(), "type": h.type})]
        except SecAggRefused as exc:  # its own secure-aggregation policy said no
            return [Record("secagg_refused", h.round, h.message_id,
                           {"type": h.type, **exc.audit_body()})]
        except MediMeshError as exc:
            return [Record("message_failed", h.round, h.message_id, {"error": str(exc)})]

    # -- extension point ---------------------------------------------------------------------
    def outgoing_update(self, update: Update, start: RoundStart) -> Update:
        """The update this site sends for ``start``, before it is sealed or masked.

        The role sends what it trained; a wrapper subclass may return another Update.
        """
        return update

    # -- internals ---------------------------------------------------------------------------
    def _drain_pending(self, effects: list[Effect]) -> list[Effect]:
        if not self._pending:
            return effects
        out, self._pending = [*self._pending, *effects], []
        return out

    def _own_policy(self, config: PolicyConfig, restarted: bool) -> HospitalPolicy:
        """The site's policy: its own file over the run's defaults, its saved state, and
        whether a restart lost that state."""
        state = None
        if self._state_dir is not None:
            text = policy_store.load_policy_text(self._state_dir)
            if text is not None:
                config = config.with_toml(text)
            state = policy_store.load_state(self._state_dir)
        policy = HospitalPolicy(self.roster, config, self._node.n_train, state,
                                state_lost=restarted and state is None)
        if restarted:
            self._pending.append(Record("hospital_policy_restored", 0, self.peer_id,
                                        {**policy.summary(), **config.describe()}))
        return policy

    def _policy_saved(self) -> list[Effect]:
        """The policy's decisions to audit; its state is kept on this site's disk first."""
        policy = self._node.policy
        if policy is None:
            return []
        effects: list[Effect] = [Record(kind, round_, subject, body)
                                 for kind, round_, subject, body in policy.drain_events()]
        if self._state_dir is not None:
            policy_store.save_state(self._state_dir, policy.state_json())
        return effects

    def _dispatch(self, type_: str, round_: int, payload: bytes) -> list[Effect]:
        node, coordinator = self._node, (self._coordinator,)
        if type_ == SetupRequest.TYPE:
            setup = decode(type_, payload, SetupRequest)
            effects: list[Effect] = [Send(node.on_setup_request(setup), coordinator, 0, wait=True)]
            isolated = node.isolated_model()
            if setup.cross_baselines and self._share_isolated and isolated and self._peers:
                # Sealed to the peer hospitals only (this roster copy's, not the request's).
                effects.append(Send(isolated, tuple(sorted(self._peers)), 0))
            return effects
        if type_ == SetupResult.TYPE:
            node.on_setup_result(decode(type_, payload, SetupResult))
            return []
        if type_ == RoundStart.TYPE:
            return self._round(decode(type_, payload, RoundStart))
        if type_ == ModelPublished.TYPE:
            report = node.on_model(decode(type_, payload, ModelPublished))
            return [*self._policy_saved(), Send(report, coordinator, round_, wait=True)]
        if type_ == SecAggAdverts.TYPE:
            shares = self._secagg.on_adverts(decode(type_, payload, SecAggAdverts))
            return [Send(shares, coordinator, round_)]
        if type_ == SecAggInbox.TYPE:
            masked = self._secagg.on_inbox(decode(type_, payload, SecAggInbox))
            return [Send(masked, (self._validator, self._coordinator), round_)]
        if type_ == SecAggCheckRequest.TYPE:
            check = self._secagg.on_check_request(decode(type_, payload, SecAggCheckRequest))
            return [Send(check, coordinator, round_)]
        if type_ == SecAggUnmaskRequest.TYPE:
            request = decode(type_, payload, SecAggUnmaskRequest)
            return [Send(self._secagg.on_unmask_request(request), coordinator, round_)]
        return []  # a type a hospital does not answer

    def _round(self, start: RoundStart) -> list[Effect]:
        self._secagg.admit(start)  # the site's own SecAgg policy, before any training
        trained = self._node.on_round_start(start, self._coordinator)
        update = self.outgoing_update(trained, start)
        effects = self._policy_saved()
        self.rounds_trained += 1
        if start.secagg_threshold:
            # Secure round: the delta stays here until it leaves masked (phase 2).
            effects.append(Send(self._secagg.start(start, update), (self._coordinator,),
                                start.round))
        else:
            effects.append(Send(update, (self._validator, self._coordinator), start.round))
        return effects
