"""A hospital actor that speaks only through an AXL front: the AXL HTTP path, measured in Ray.

``medimesh bench rounds --transport axl`` runs its hospitals as this class: each is still a Ray
actor (ten hospital processes with their own Python would not fit a 2-core machine), but the
router never pushes to it. It is attached to the router only through the AXL front (a mailbox)
and polls ``GET /recv`` (signed) and sends with ``POST /send`` over TLS (``AxlTransport``), like
``medimesh node hospital`` does; its audit events still reach the auditor by Ray.
"""

from __future__ import annotations

import threading
from typing import Any

from medimesh.actors.hospital import Hospital

__all__ = ["AxlHospital"]


class AxlHospital(Hospital):
    def __init__(self, *args: Any, axl_url: str, axl_pin: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from medimesh.node.front import connect

        axl = connect(axl_url, self.identity, axl_pin)  # TLS pinned, signed /recv
        self.transport = axl  # type: ignore[assignment]  # the Transport seam
        self._lock = threading.Lock()  # the poller's deliveries vs the runtime's calls
        self._stop = threading.Event()
        threading.Thread(target=axl.listen, args=(self._deliver_locked, self._stop),
                         daemon=True, name="axl-poll").start()

    def _deliver_locked(self, envelope: bytes) -> None:
        with self._lock:
            self.deliver(envelope)

    def sync_audit(self) -> int:
        with self._lock:
            return super().sync_audit()

    def info(self) -> dict[str, Any]:
        with self._lock:
            return super().info()
