"""The hostile coordinator's seat at the router, shared by the operator scenarios.

The operator owns the router, so it can register an actor of its own under the coordinator's
peer id: every envelope the hospitals seal to the coordinator then lands in :class:`Inbox`,
which the scenario opens with the coordinator's key (the operator holds it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Inbox", "take_coordinator_seat"]


class Inbox:
    """Keeps the (sealed) envelopes that arrive for the peer id it is registered as (the
    coordinator's here; tests use it as any push peer)."""

    def __init__(self) -> None:
        self._got: list[bytes] = []

    def deliver(self, envelope: bytes) -> None:
        self._got.append(envelope)

    def take(self) -> list[bytes]:
        out, self._got = self._got, []
        return out

    def received(self) -> list[bytes]:
        """Everything kept so far, in arrival order (kept: a test may ask again)."""
        return list(self._got)


def take_coordinator_seat(router: Any, peer_id: str) -> Any:
    """Start an :class:`Inbox` actor and register it at ``router`` as ``peer_id``."""
    import ray

    inbox = ray.remote(num_cpus=0)(Inbox).remote()
    ray.get(router.register.remote(peer_id, inbox))
    return inbox
