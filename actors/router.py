"""The router actor: Gensyn AXL semantics inside Ray. It forwards ciphertext it cannot read.

``send`` authenticates the sender from the outer signature, refuses unenrolled peers and
unreachable recipients (AXL's 502), applies injected faults and pushes the envelope to each
recipient's ``deliver``. Peers registered without a handle get a mailbox drained by ``recv``
(AXL's pull API; 204 is ``None``), bounded at AXL's 100 messages: a full mailbox drops its
oldest message, counts it per peer and audits ``mailbox_overflow``. No store-and-forward: a
delivery to a dead actor is lost. A simulated WAN delay (``set_faults(delay_s=, jitter_s=)``)
schedules each hop on a delay line, so delayed deliveries overlap instead of queueing.

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
from functools import partial
from typing import Any

import ray
import structlog

from medimesh.actors import telemetry
from medimesh.actors.base import Audited
from medimesh.errors import MediMeshError, PeerUnreachable
from medimesh.routing import MAILBOX_LIMIT, DelayLine, Faults, Mailboxes, RoutingTable
from medimesh.wire import Header, digest

__all__ = ["DOWN_AFTER_S", "MAILBOX_LIMIT", "SLOW_AFTER_S", "Router"]

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
        self._boxes = Mailboxes(MAILBOX_LIMIT)
        # The delay line's thread delivers too: it and the actor's methods share this lock
        # around mailboxes, counters and audit records (the audit numbers its events).
        self._lock = threading.RLock()
        self._delay_line = DelayLine()
        self._hops: deque[dict[str, Any]] = deque(maxlen=4096)  # delayed hops, for drills
        self._directory = dict(directory or {})
        self._namespace = namespace
        self._last_push: dict[str, tuple[Any, float]] = {}
        self._oldest: dict[str, tuple[Any, float]] = {}  # oldest delivery not known processed
        self._described: dict[str, dict[str, Any]] = {}  # peer -> what its launcher told us
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
            with self._lock:
                self._boxes.open(peer_id)
            self._handles.pop(peer_id, None)
        else:
            self._handles[peer_id] = handle

    def unregister(self, peer_id: str) -> None:
        self._table.detach(peer_id)
        self._handles.pop(peer_id, None)

    def set_faults(
        self,
        drop: float = 0.0,
        delay_s: float = 0.0,
        partitions: list[list[str]] | None = None,
        jitter_s: float = 0.0,
    ) -> None:
        """Drop probability, per-hop delay ``delay_s`` ± ``jitter_s`` (deterministic from the
        fault seed) and partitions."""
        self._table.faults = Faults(
            drop, delay_s, tuple(frozenset(p) for p in (partitions or [])), jitter_s
        )
        log.info("faults set", drop=drop, delay_s=delay_s, jitter_s=jitter_s,
                 partitions=len(partitions or []))

    def send(self, envelope: bytes) -> int:
        """Route one envelope; returns the number of recipients it was forwarded to."""
        with self._lock:
            return self._send(envelope)

    def _send(self, envelope: bytes) -> int:
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
        for peer in deliver:
            if peer not in self._boxes and self._handle(peer) is None:
                raise PeerUnreachable(f"no route to {peer[:12]}…")
        routed_at = time.monotonic()
        for peer in deliver:
            due = self._table.hop_due(header.sender, peer, routed_at)
            if due <= routed_at:
                self._deliver(header, peer, envelope)
                continue
            hop: dict[str, Any] = {"message_id": header.message_id, "to": peer,
                                   "routed_at": routed_at, "due_at": due, "delivered_at": None}
            self._hops.append(hop)
            self._delay_line.at(due, partial(self._deliver, header, peer, envelope, hop))
        return len(deliver)

    def _deliver(
        self, header: Header, peer: str, envelope: bytes, hop: dict[str, Any] | None = None
    ) -> None:
        """One hop: into the peer's mailbox (counting and auditing overflow) or pushed to its
        actor. Runs in ``send`` or, for a delayed hop, on the delay line's thread."""
        with self._lock:
            if hop is not None:
                hop["delivered_at"] = time.monotonic()
            handle = self._handle(peer)
            if handle is None:
                if peer not in self._boxes:
                    return  # detached while the hop was in flight: lost, as on AXL
                dropped = self._boxes.put(peer, header.sender, envelope)
                if dropped:
                    self._table.overflowed(peer, dropped)
                    self.audit.record("mailbox_overflow", header.round, peer, {
                        "peer": peer, "dropped": dropped, "limit": self._boxes.limit,
                        "dropped_total": self._boxes.dropped[peer],
                    })
                    log.warning("mailbox overflow", peer=peer[:12], dropped=dropped,
                                limit=self._boxes.limit)
                    self.maybe_flush()
                return
            # Fire-and-forget, as AXL: not awaiting the ref halves the router's cost per
            # delivery. A dead recipient loses the message; the protocol's deadlines cope.
            push = (handle.deliver.remote(envelope), time.time())
            self._last_push[peer] = push
            self._oldest.setdefault(peer, push)

    def flush_audit(self) -> int:
        with self._lock:  # the delay line's thread flushes too
            return super().flush_audit()

    def sync_audit(self) -> int:
        with self._lock:
            return super().sync_audit()

    def hops(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The last delayed hops (router's monotonic clock): when each was routed, when it
        was due, when it was delivered (None: not yet)."""
        with self._lock:
            return [dict(h) for h in list(self._hops)[-limit:]]

    def health(self) -> dict[str, str]:
        """Per pushed-to peer: "live", "slow", "restarting" or "down", from the outcome of the
        last delivery (a dead actor fails it; a restarting one cannot take it yet)."""
        out: dict[str, str] = {}
        now = time.time()
        for peer, (ref, sent) in list(self._last_push.items()):  # the delay line adds too
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

    def describe(self, peer_id: str, info: dict[str, Any]) -> None:
        """Labels for ``/network`` from whoever started a peer (e.g. the demo: ``runs_as``
        "process", its ``pid``); shown as given, never used for routing."""
        self._table.roster.get(peer_id)  # raises NotEnrolled
        self._described[peer_id] = dict(info)

    def recv(self, peer_id: str) -> tuple[str, bytes] | None:
        """Pull the next message for a mailbox peer; ``None`` means empty (AXL's 204)."""
        with self._lock:
            return self._boxes.pop(peer_id)

    def recv_batch(self, peer_ids: list[str]) -> list[tuple[str, str, bytes]]:
        """At most one message for each mailbox peer in ``peer_ids`` that has one: what an AXL
        front's long-polled ``/recv`` requests wait for, asked in one call per tick."""
        with self._lock:
            items = ((p, self._boxes.pop(p)) for p in peer_ids)
            return [(p, item[0], item[1]) for p, item in items if item is not None]

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
        with self._lock:
            out = self._table.stats()
            out["mailboxes"] = {"limit": self._boxes.limit,
                                "dropped": dict(self._boxes.dropped),
                                "delayed_in_flight": self._delay_line.pending()}
            now = time.time()
            boxes = {pid: self._boxes.describe(pid, now)
                     for pid in out["peers"] if pid in self._boxes}
        health = self.health()
        for pid, peer in out["peers"].items():
            peer.update(self._described.get(pid, {}))
            if pid in boxes:  # an AXL peer: reachable while it keeps polling its mailbox
                peer.update(boxes[pid])
                continue
            peer["transport"] = "ray"
            peer["status"] = health.get(pid, "live" if peer.get("reachable") else "down")
        return out

    def bytes_routed(self) -> int:
        return sum(self._table.bytes_by_type.values())

    def events(self, since: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self._table.events_since(since, limit)
