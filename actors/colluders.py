"""The attackers' side channel: what colluding hospitals know beyond their own share.

This is outside MediMesh — a stand-in for whatever channel real colluders would use — and
exists only so benchmarks and tests can run the colluding attacks from the literature:

- colluders share their honest deltas (ALIE, IPM, min-max, min-sum, relay, frame_oppose);
- for the framing attacks it predicts an honest victim's update. The stand-in for a
  "predictable" honest update is a leaked copy of the victim's rows: local training is
  deterministic, so replaying it on the round's base model (and the consortium's
  standardization, which every hospital receives) yields the update the victim sends. The
  victim runs unchanged code and never talks to this actor.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from medimesh.aggregation import flatten
from medimesh.hospital import HospitalNode
from medimesh.protocol import RoundStart, SetupResult
from medimesh.sites import SiteDescriptor, dataset_info, load_site

__all__ = ["Colluders"]


class Colluders:
    def __init__(
        self, members: int, timeout_s: float = 10.0, victim: SiteDescriptor | None = None
    ) -> None:
        self._members = members
        self._timeout = timeout_s
        self._shared: dict[int, list[np.ndarray]] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._victim = (
            None if victim is None
            else HospitalNode(load_site(victim), dataset_info(victim.kind, victim.params))
        )
        self._predicted: dict[tuple[int, str], np.ndarray] = {}

    async def share(self, round_: int, honest: np.ndarray) -> list[np.ndarray]:
        """Add one colluder's honest delta; return all of them once every colluder has shared."""
        group = self._shared.setdefault(round_, [])
        event = self._ready.setdefault(round_, asyncio.Event())
        group.append(np.asarray(honest))
        if len(group) >= self._members:
            event.set()
        with contextlib.suppress(TimeoutError):  # a colluder is missing: use what we have
            await asyncio.wait_for(event.wait(), self._timeout)
        return list(group)

    def victim_setup(self, result: SetupResult) -> None:
        """The consortium's standardization, as an attacker received it (every site does)."""
        if self._victim is not None:
            self._victim.on_setup_result(result)

    def victim_update(self, start: RoundStart) -> np.ndarray | None:
        """The flattened delta the victim sends for ``start`` (None: no victim, or no setup)."""
        if self._victim is None or not self._victim.ready:
            return None
        key = (start.round, start.base_hash)
        if key not in self._predicted:  # several framers ask once each
            u = self._victim.on_round_start(start)
            self._predicted[key] = flatten(u.delta_w, u.delta_b)
        return self._predicted[key]

    def stats(self) -> dict[str, int]:
        """What the side channel did (tests check that a framing attack really had its input)."""
        return {"rounds_shared": len(self._shared), "victim_updates": len(self._predicted)}
