"""A dishonest hospital for tests and benchmarks: the production role, wrapped from outside.

:class:`AdversarialHospitalRole` is :class:`medimesh.roles.hospital.HospitalRole` plus one
``behaviour``; the production role has no branch for any of them. It uses the role's two
extension points only: :meth:`~HospitalRole.outgoing_update` (change the trained update before
it is sealed or masked) and :meth:`~HospitalRole.handle` (rewrite the effects returned).

Behaviours (``BEHAVIOURS``):

* statistical attacks (medimesh.attacks.ATTACKS): change the delta; ``label_flip`` flips the
  training labels before the role is built. Colluding and framing attacks use the attackers'
  own :class:`SideChannel` (outside MediMesh; a Ray shell adapts ``actors/colluders.py``).
* protocol attacks (medimesh.adversary.PROTOCOL_ATTACKS): from round 2 the envelope that
  carries the update is replaced by a malicious one.
* drills (``DRILLS``): ``secagg_dropout`` sends its masked update, then never answers the
  unmasking request; ``secagg_liar`` adds ``LIAR_SHIFT * C`` to the first coordinate of its
  masked input (medimesh.secagg_lie).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medimesh.adversary import PROTOCOL_ATTACKS, AttackContext, protocol_envelope
from medimesh.aggregation import flatten, unflatten
from medimesh.attacks import ATTACKS, COLLUDING, FRAMING, attack_update, flip_labels
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Roster
from medimesh.policy import HospitalPolicy, PolicyConfig
from medimesh.protocol import (
    RoundStart,
    SecAggMasked,
    SecAggUnmaskRequest,
    SetupResult,
    Update,
    decode,
)
from medimesh.roles import Effect, Record, Send, SendRaw
from medimesh.roles.hospital import HospitalRole, WitnessSink
from medimesh.secagg_lie import LIAR_SHIFT, lie
from medimesh.sites import DatasetInfo, LocalData
from medimesh.wire import Opened, seal

__all__ = ["BEHAVIOURS", "DRILLS", "AdversarialHospitalRole", "SideChannel"]

# Failure drills, not attacks (see the module docstring).
DRILLS = frozenset({"secagg_dropout", "secagg_liar"})
BEHAVIOURS = frozenset(ATTACKS) | frozenset(PROTOCOL_ATTACKS) | DRILLS


class SideChannel(Protocol):
    """What colluding attackers share outside MediMesh (actors/colluders.py's Colluders)."""

    def share(self, round_: int, honest: np.ndarray) -> list[np.ndarray]: ...

    def victim_setup(self, result: SetupResult) -> None: ...

    def victim_update(self, start: RoundStart) -> np.ndarray | None: ...


class AdversarialHospitalRole(HospitalRole):
    """The hospital role with ``behaviour`` applied from outside it.

    ``channel``: the attackers' side channel (None: colluding attacks use only their own
    delta, framing attacks send the honest one). ``n_byzantine``: how many attackers the
    colluding attacks assume (at least 1). Other arguments as :class:`HospitalRole`.
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        data: LocalData,
        info: DatasetInfo,
        *,
        behaviour: str,
        channel: SideChannel | None = None,
        n_byzantine: int = 0,
        policy: HospitalPolicy | PolicyConfig | None = None,
        state_dir: str | Path | None = None,
        restarted: bool = False,
        cross_baselines: bool = True,
        secure_aggregation: bool = False,
        witness: WitnessSink | None = None,
    ) -> None:
        if behaviour not in BEHAVIOURS:
            raise ConfigError(f"unknown behaviour {behaviour!r}")
        self.behaviour = behaviour
        self._rng = np.random.default_rng(int(identity.peer_id[:8], 16))
        if behaviour == "label_flip":
            flipped = flip_labels(data.y_train, len(info.class_names), self._rng)
            data = dataclasses.replace(data, y_train=flipped)
        super().__init__(
            identity, roster, data, info, policy=policy, state_dir=state_dir,
            restarted=restarted, cross_baselines=cross_baselines,
            secure_aggregation=secure_aggregation, witness=witness,
        )
        self._channel = channel
        self._n_byzantine = n_byzantine
        self._hospitals = [m.peer_id for m in roster.with_role("hospital")]
        self._start: RoundStart | None = None
        self._last_envelope: bytes | None = None  # what a replaying attacker captured last
        # Global models seen (first, last) and the last step: what a time-coupled attack uses.
        self._first_base: np.ndarray | None = None
        self._last_base: tuple[str, np.ndarray] | None = None
        self._step: np.ndarray | None = None

    def handle(self, opened: Opened) -> list[Effect]:
        h = opened.header
        from_coordinator = h.sender == self.coordinator
        if self.behaviour == "secagg_dropout" and from_coordinator and (
            h.type == SecAggUnmaskRequest.TYPE
        ):
            return [Record("secagg_dropout_drill", h.round, self.peer_id, {})]
        effects = super().handle(opened)
        if (self.behaviour in FRAMING and self._channel is not None and from_coordinator
                and h.type == SetupResult.TYPE and not effects):
            self._channel.victim_setup(decode(h.type, opened.payload, SetupResult))
        return [self._rewrite(e) for e in effects]

    def outgoing_update(self, update: Update, start: RoundStart) -> Update:
        """Apply a statistical attack to the honest delta (unchanged for other behaviours)."""
        self._start = start
        name, round_ = self.behaviour, start.round
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
        if self._channel is not None:
            if name in COLLUDING:
                group = self._channel.share(round_, honest)
            if name in FRAMING:
                victim = self._channel.victim_update(start)
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
            n_clients=len(self._hospitals),
            n_byzantine=max(self._n_byzantine, 1),
            victim=victim,
            **extra,
        )
        dw, db = unflatten(vec, *update.delta_w.shape)
        return dataclasses.replace(
            update, delta_w=dw.astype(np.float32), delta_b=db.astype(np.float32)
        )

    def _rewrite(self, effect: Effect) -> Effect:
        if not isinstance(effect, Send):
            return effect
        if isinstance(effect.msg, Update) and self.behaviour in PROTOCOL_ATTACKS:
            return SendRaw(self._protocol_attack(effect.msg, effect.to, effect.round))
        if isinstance(effect.msg, SecAggMasked) and self.behaviour == "secagg_liar":
            params = self.secagg_params(effect.round)
            shift = np.zeros(params.dim)
            shift[0] = LIAR_SHIFT * params.quantizer.clip
            return dataclasses.replace(effect, msg=lie(effect.msg, self.identity, params, shift))
        return effect

    def _protocol_attack(self, update: Update, to: tuple[str, ...], round_: int) -> bytes:
        if round_ < 2 or self._start is None:
            envelope = seal(self.identity, Update.TYPE, list(to), round_, update.to_payload())
            self._last_envelope = envelope
            return envelope
        ctx = AttackContext(
            self.identity,
            list(to),
            round_,
            self._last_envelope,
            next(v for v in self._hospitals if v != self.peer_id),
            int(self._start.committed.get(self.peer_id, self.n_train)),
        )
        return protocol_envelope(self.behaviour, ctx, update)
