"""The transport seam: hospital code sends envelopes without knowing what carries them.

Inside one Ray cluster the carrier is the router actor; across institutions it can be a real
Gensyn AXL node reached over its HTTP API. Receiving is push-based: whatever carries messages
calls the node's ``deliver(envelope)``.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Transport"]


class Transport(Protocol):
    """Fire-and-forget delivery with AXL's error semantics."""

    async def send(self, envelope: bytes) -> int:
        """Hand an envelope to the network; returns how many recipients it was forwarded to.

        Raises PeerUnreachable (AXL: HTTP 502) or NotEnrolled when the router refuses it.
        """
        ...
