"""The router actor: Gensyn AXL semantics inside Ray. It forwards ciphertext it cannot read.

``send`` authenticates the sender from the outer signature, refuses unenrolled peers and
unreachable recipients (AXL's 502), applies injected faults and pushes the envelope to each
recipient's ``deliver``. Peers registered without a handle get a mailbox drained by ``recv``
(AXL's pull API; 204 is ``None``). No store-and-forward: a delivery to a dead actor is lost.

Restarts: the runtime hands the router a ``directory`` (peer id -> Ray actor name), so a
restarted router (fresh ``__init__``, same arguments) finds its peers again by name; only the
envelopes in flight are lost. Each push leaves one reference per peer behind, and ``health``
reads those to say which peers are live, slow, restarting or down.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from typing import Any

import ray
import structlog

from medimesh.actors import telemetry
from medimesh.actors.base import Audited
from medimesh.errors import MediMeshError, PeerUnreachable
from medimesh.routing import Faults, RoutingTable
from medimesh.wire import digest

__all__ = ["DOWN_AFTER_S", "MAILBOX_LIMIT", "SLOW_AFTER_S", "Router"]

MAILBOX_LIMIT = 1024
SLOW_AFTER_S = 2.0  # a delivery still unprocessed after this long marks its peer "slow"
DOWN_AFTER_S = 10.0  # restarting for longer than this (no node can take it): "down"
log = structlog.get_logger("medimesh.router")


class Router(Audited):
    def __init__(
        self,
        seed: bytes,
        roster_json: str,
        auditor: Any = None,
        fault_seed: int = 0,
        capture: int = 0,
        directory: dict[str, str] | None = None,
        namespace: str = "medimesh",
    ) -> None:
        super().__init__(seed, roster_json, auditor)
        # Keeps the last `capture` routed envelopes (ciphertext, as the router sees them) so
        # tests and drills can inspect exactly what crossed the network. Off by default.
        self._captured: deque[bytes] = deque(maxlen=max(capture, 0))
        self._table = RoutingTable(self.roster, self.peer_id, rng=random.Random(fault_seed))
        self._handles: dict[str, Any] = {}
        self._mailboxes: dict[str, deque[tuple[str, bytes]]] = {}
        self._directory = dict(directory or {})
        self._namespace = namespace
        self._last_push: dict[str, tuple[Any, float]] = {}
        self._oldest: dict[str, tuple[Any, float]] = {}  # oldest delivery not known processed
        for peer_id in self._directory:
            self._table.attach(peer_id)

    def _handle(self, peer_id: str) -> Any:
        """The peer's actor handle: registered, or looked up by name (after a restart)."""
        handle = self._handles.get(peer_id)
        if handle is None and peer_id in self._directory:
            try:
                handle = ray.get_actor(self._directory[peer_id], self._namespace)
            except ValueError:  # not created yet, or gone for good
                return None
            self._handles[peer_id] = handle
        return handle

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
        telemetry.record_routed(header.type, len(envelope))
        self._captured.append(envelope)
        delay = self._table.faults.delay_s
        for peer in deliver:
            handle = self._handle(peer)
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
                push = (handle.deliver.remote(envelope), time.time())
                self._last_push[peer] = push
                self._oldest.setdefault(peer, push)
        return len(deliver)

    def health(self) -> dict[str, str]:
        """Per pushed-to peer: "live", "slow", "restarting" or "down", from the outcome of the
        last delivery (a dead actor fails it; a restarting one cannot take it yet)."""
        out: dict[str, str] = {}
        now = time.time()
        for peer, (ref, sent) in self._last_push.items():
            oldest = self._oldest.get(peer, (ref, sent))
            if oldest[0] is not ref and ray.wait([oldest[0]], timeout=0)[0]:
                oldest = self._oldest[peer] = (ref, sent)  # processed up to there: restart clock
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                waiting = now - oldest[1]
                out[peer] = "live" if waiting <= SLOW_AFTER_S else self._pending_status(
                    peer, waiting
                )
                continue
            try:
                ray.get(ref, timeout=0)
                out[peer] = "live"
            except ray.exceptions.ActorUnavailableError:
                gone_for = now - sent  # no node may ever take it back (its node was removed)
                out[peer] = "restarting" if gone_for < DOWN_AFTER_S else "down"
            except ray.exceptions.ActorDiedError:
                out[peer] = "down"
            except Exception:  # the actor ran the delivery and raised: alive, if unhappy
                out[peer] = "live"
        return out

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

    def _pending_status(self, peer: str, waiting: float) -> str:
        """A delivery waiting for long: a slow actor, or one Ray cannot bring back (its node is
        gone, so the restart waits for a resource that no longer exists)."""
        # The GCS actor table (ray.util.state needs the dashboard, which tests and small
        # deployments run without).
        from ray._private import state

        handle = self._handles.get(peer)
        try:
            entry = state.actors(actor_id=handle._actor_id.hex()) if handle is not None else {}
        except Exception:  # best effort: "slow" is still true
            return "slow"
        actor_state = entry.get("State", "")
        if actor_state == "DEAD":
            return "down"
        if actor_state == "RESTARTING":
            return "restarting" if waiting < DOWN_AFTER_S else "down"
        return "slow"

    def stats(self) -> dict[str, Any]:
        out = self._table.stats()
        health = self.health()
        for pid, peer in out["peers"].items():
            peer["status"] = health.get(pid, "live" if peer.get("reachable") else "down")
        return out

    def bytes_routed(self) -> int:
        return sum(self._table.bytes_by_type.values())

    def events(self, since: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self._table.events_since(since, limit)
