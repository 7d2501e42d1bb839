"""A dishonest hospital actor for tests and benchmarks (started only for a site given a
``behaviour`` other than "honest"; a run's hospitals are actors/hospital.py's Hospital).

The same Ray shell as :class:`~medimesh.actors.hospital.Hospital`, driving
:class:`medimesh.roles.adversarial.AdversarialHospitalRole` (the production role wrapped from
outside) instead of the production role, and adapting the attackers' Ray side channel
(actors/colluders.py) to the wrapper's :class:`~medimesh.roles.adversarial.SideChannel`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from medimesh.actors.base import resolve
from medimesh.actors.hospital import Hospital
from medimesh.errors import ConfigError
from medimesh.protocol import RoundStart, SetupResult
from medimesh.roles.adversarial import BEHAVIOURS, AdversarialHospitalRole
from medimesh.roles.hospital import HospitalRole
from medimesh.sites import DatasetInfo, LocalData

__all__ = ["AttackingHospital", "RayChannel"]


class RayChannel:
    """The Colluders actor as a :class:`~medimesh.roles.adversarial.SideChannel`."""

    def __init__(self, colluders: Any) -> None:
        self._actor = colluders

    def share(self, round_: int, honest: np.ndarray) -> list[np.ndarray]:
        return list(ray.get(self._actor.share.remote(round_, honest)))

    def victim_setup(self, result: SetupResult) -> None:
        ray.get(self._actor.victim_setup.remote(result))

    def victim_update(self, start: RoundStart) -> np.ndarray | None:
        vec: np.ndarray | None = ray.get(self._actor.victim_update.remote(start))
        return vec


class AttackingHospital(Hospital):
    """A hospital with a ``behaviour`` (an attack or a drill, medimesh.roles.adversarial)."""

    @staticmethod
    def _check_behaviour(behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ConfigError(f"unknown behaviour {behaviour!r}")

    def _make_role(
        self, data: LocalData, info: DatasetInfo, behaviour: str,
        wrapper_args: tuple[Any, ...], **options: Any,
    ) -> HospitalRole:
        """``wrapper_args``: (colluders, n_byzantine), as the runtime passes them after
        ``behaviour``: the Colluders actor (a handle, an ActorName or None) and how many
        attackers the colluding attacks assume."""
        actor = resolve(wrapper_args[0]) if wrapper_args else None
        n_byzantine = int(wrapper_args[1]) if len(wrapper_args) > 1 else 0
        return AdversarialHospitalRole(
            self.identity, self.roster, data, info, behaviour=behaviour,
            channel=None if actor is None else RayChannel(actor), n_byzantine=n_byzantine,
            **options,
        )
