"""The transport seam: node code sends envelopes without knowing what carries them.

Inside one Ray cluster the carrier is the router actor (``medimesh.actors.base``'s
``RouterTransport``); across institutions it can be a real Gensyn AXL node reached over its
HTTP API. Receiving is push-based: whatever carries messages calls the node's
``deliver(envelope)`` (an AXL transport would poll ``GET /recv`` and do the same).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Transport"]


class Transport(Protocol):
    """Fire-and-forget delivery with AXL's error semantics."""

    def send(self, envelope: bytes) -> int:
        """Hand an envelope to the network and wait for its answer (AXL's ``POST /send``).

        Returns how many recipients it was forwarded to; raises PeerUnreachable (AXL: 502)
        or NotEnrolled when refused.
        """
        ...

    def post(self, envelope: bytes) -> None:
        """Hand an envelope over without waiting; refusals surface through :meth:`failures`."""
        ...

    def failures(self) -> list[str]:
        """Refusals of earlier posts, oldest first (each reported once)."""
        ...
