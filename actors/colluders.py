"""The attackers' side channel: colluding hospitals share their honest deltas (ALIE, IPM).

This is outside MediMesh — a stand-in for whatever channel real colluders would use — and
exists only so benchmarks and tests can run the colluding attacks from the literature.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

__all__ = ["Colluders"]


class Colluders:
    def __init__(self, members: int, timeout_s: float = 10.0) -> None:
        self._members = members
        self._timeout = timeout_s
        self._shared: dict[int, list[np.ndarray]] = {}
        self._ready: dict[int, asyncio.Event] = {}

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
