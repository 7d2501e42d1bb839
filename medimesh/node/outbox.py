"""A remote node's audit outbox: its signed events, batched and sealed to the auditor.

Inside Ray an actor hands its events to the auditor by a Ray call; outside, the node seals an
:class:`~medimesh.protocol.AuditEvents` batch to the auditor's peer id and sends it through its
AXL node like any message (the auditor checks it, medimesh.audit_ingest). A batch whose send
fails is kept, sealed, and re-sent byte for byte (the AXL front routes an envelope it already
routed only once), so a slow or restarting front loses nothing and chains nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from medimesh.audit import AuditEvent
from medimesh.audit_ingest import event_to_json
from medimesh.errors import MediMeshError
from medimesh.identity import Identity
from medimesh.protocol import AuditEvents
from medimesh.wire import seal

__all__ = ["AuditOutbox"]


class AuditOutbox:
    """Events waiting for the auditor; :meth:`flush` sends them in order, oldest batch first."""

    def __init__(
        self, identity: Identity, auditor: str, *, batch: int = 256, every_s: float = 0.5
    ) -> None:
        self._identity = identity
        self._auditor = auditor
        self._batch = batch
        self._every_s = every_s
        self._events: list[AuditEvent] = []
        self._sealed: tuple[bytes, int] | None = None  # the batch being sent, and its size
        self._last = time.monotonic()
        self.sent = 0
        self.failures = 0
        self.last_error = ""

    def add(self, events: Sequence[AuditEvent]) -> None:
        self._events.extend(events)

    def pending(self) -> int:
        """Events not yet accepted by the AXL node (sealed or not)."""
        return len(self._events) + (self._sealed[1] if self._sealed else 0)

    def due(self) -> bool:
        waiting = self.pending()
        return waiting >= self._batch or (
            waiting > 0 and time.monotonic() - self._last >= self._every_s
        )

    def flush(self, send: Callable[[bytes], object]) -> int:
        """Send everything pending through ``send`` (e.g. ``AxlTransport.send``); returns how
        many events went. Stops at the first failure, keeping that batch for the next flush."""
        self._last = time.monotonic()
        went = 0
        while self._sealed is not None or self._events:
            if self._sealed is None:
                chunk, self._events = self._events[: self._batch], self._events[self._batch :]
                msg = AuditEvents([event_to_json(e) for e in chunk])
                envelope = seal(self._identity, msg.TYPE, [self._auditor], 0, msg.to_payload())
                self._sealed = (envelope, len(chunk))
            envelope, n = self._sealed
            try:
                send(envelope)
            except MediMeshError as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                return went
            self._sealed = None
            went += n
            self.sent += n
        return went
