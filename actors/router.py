"""The router actor: Gensyn AXL semantics inside Ray. It forwards ciphertext it cannot read.

``send`` authenticates the sender from the outer signature, refuses unenrolled peers and
unreachable recipients (AXL's 502), applies injected faults and pushes the envelope to each
recipient's ``deliver``. Peers registered without a handle get a mailbox drained by ``recv``
(AXL's pull API; 204 is ``None``). No store-and-forward: a delivery to a dead actor is lost.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from typing import Any

import structlog

from medimesh.actors.base import Audited
from medimesh.errors import MediMeshError, PeerUnreachable
from medimesh.routing import Faults, RoutingTable
from medimesh.wire import digest

__all__ = ["MAILBOX_LIMIT", "Router"]

MAILBOX_LIMIT = 1024
log = structlog.get_logger("medimesh.router")


class Router(Audited):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        auditor: Any = None,
        fault_seed: int = 0,
        capture: int = 0,
    ) -> None:
        super().__init__(seed, roster_json, auditor)
        # Keeps the last `capture` routed envelopes (ciphertext, as the router sees them) so
        # tests and drills can inspect exactly what crossed the network. Off by default.
        self._captured: deque[bytes] = deque(maxlen=max(capture, 0))
        self._table = RoutingTable(self.roster, self.peer_id, rng=random.Random(fault_seed))
        self._handles: dict[str, Any] = {}
        self._mailboxes: dict[str, deque[tuple[str, bytes]]] = {}

    def whoami(self) -> str:
        return self.peer_id

    def register(self, peer_id: str, handle: Any = None) -> None:
        """Attach an enrolled peer: push delivery to ``handle.deliver`` or a pull mailbox."""
        self._table.attach(peer_id)
        if handle is None:
            self._mailboxes.setdefault(peer_id, deque(maxlen=MAILBOX_LIMIT))
            self._handles.pop(peer_id, None)
        else:
            self._handles[peer_id] = handle

    def unregister(self, peer_id: str) -> None:
        self._table.detach(peer_id)
        self._handles.pop(peer_id, None)

    def set_faults(
        self, drop: float = 0.0, delay_s: float = 0.0, partitions: list[list[str]] | None = None
    ) -> None:
        self._table.faults = Faults(
            drop, delay_s, tuple(frozenset(p) for p in (partitions or []))
        )
        log.info("faults set", drop=drop, delay_s=delay_s, partitions=len(partitions or []))

    def send(self, envelope: bytes) -> int:
        """Route one envelope; returns the number of recipients it was forwarded to."""
        try:
            header, deliver = self._table.route(envelope)
        except MediMeshError as exc:
            self.audit.record(
                "message_refused", -1, digest(envelope), {"reason": type(exc).__name__}
            )
            self.maybe_flush()
            raise
        self.audit.record(
            "message_routed",
            header.round,
            header.message_id,
            {
                "type": header.type,
                "from": header.sender,
                "to": list(header.recipients),
                "delivered": len(deliver),
                "bytes": len(envelope),
                "digest": digest(envelope),
            },
        )
        self.maybe_flush()
        self._captured.append(envelope)
        delay = self._table.faults.delay_s
        for peer in deliver:
            handle = self._handles.get(peer)
            if handle is None:
                box = self._mailboxes.get(peer)
                if box is None:
                    raise PeerUnreachable(f"no route to {peer[:12]}…")
                box.append((header.sender, envelope))
                continue
            if delay > 0:
                timer = threading.Timer(delay, handle.deliver.remote, args=(envelope,))
                timer.daemon = True
                timer.start()
            else:
                # Fire-and-forget, as AXL: not awaiting the ref halves the router's cost per
                # delivery. A dead recipient loses the message; the protocol's deadlines cope.
                handle.deliver.remote(envelope)
        return len(deliver)

    def recv(self, peer_id: str) -> tuple[str, bytes] | None:
        """Pull the next message for a mailbox peer; ``None`` means empty (AXL's 204)."""
        box = self._mailboxes.get(peer_id)
        if not box:
            return None
        return box.popleft()

    def captured(self) -> list[bytes]:
        """The envelopes kept by ``capture`` (empty unless capture was enabled)."""
        return list(self._captured)

    def topology(self) -> dict[str, Any]:
        return self._table.topology()

    def stats(self) -> dict[str, Any]:
        out = self._table.stats()
        return out

    def bytes_routed(self) -> int:
        return sum(self._table.bytes_by_type.values())

    def events(self, since: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self._table.events_since(since, limit)
