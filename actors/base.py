"""What every MediMesh actor shares: identity, roster, transport and an audit outbox.

Hospital, router, validator and auditor are *synchronous* Ray actors: measured here, a call
into an async actor costs about twice the CPU of a call into a sync one (0.30 vs 0.15 ms),
and CPU is what a 2-core machine runs out of first. Only the coordinator, which must wait
for many messages at once, is async.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from medimesh.audit import AuditEvent, AuditRecorder
from medimesh.identity import Identity, Roster
from medimesh.protocol import Message
from medimesh.wire import seal

__all__ = [
    "AUDIT_FLUSH_EVENTS", "AUDIT_FLUSH_S", "ActorName", "Audited", "Node", "RouterTransport",
    "resolve",
]

AUDIT_FLUSH_EVENTS = 64
AUDIT_FLUSH_S = 0.25


@dataclass(frozen=True, slots=True)
class ActorName:
    """A named actor handed to a constructor by name instead of by handle.

    A restartable actor (``max_restarts > 0``) must not take actor handles as constructor
    arguments: Ray keeps such arguments in the object store, cannot guarantee them when it
    restarts the actor (ray-project/ray#53727) and logs an error line at creation. A name is a
    plain string; the actor looks the handle up in its own process, again after each restart.
    """

    name: str
    namespace: str

    def resolve(self) -> Any:
        import ray

        return ray.get_actor(self.name, self.namespace)


def resolve(ref: Any) -> Any:
    """The actor handle for ``ref``: an :class:`ActorName` is looked up, anything else (a
    handle, or None) is returned as it is."""
    return ref.resolve() if isinstance(ref, ActorName) else ref


class RouterTransport:
    """Sends through the router actor and waits for its accept/refuse answer (AXL's /send)."""

    def __init__(self, router: Any) -> None:
        self._router = resolve(router)
        self._pending: list[Any] = []

    def send(self, envelope: bytes) -> int:
        import ray

        return int(ray.get(self._router.send.remote(envelope)))

    def post(self, envelope: bytes) -> None:
        """Send without waiting for the router's answer; :meth:`failures` reports refusals later.

        A hospital has nothing to do while the router works, and not blocking on each answer
        saves CPU that a 2-core machine needs for the other hospitals.
        """
        self._pending.append(self._router.send.remote(envelope))

    def failures(self, batch: int = 8) -> list[str]:
        """Errors the router answered to earlier posts (AXL's 502 and refusals), oldest first.

        Checked once ``batch`` answers are outstanding (``batch=1``: every time), since asking
        Ray costs more than a post; a refusal is reported at most a few rounds late.
        """
        import ray

        if len(self._pending) < batch:
            return []
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        errors = []
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # the router's refusal, re-raised by Ray
                errors.append(f"{type(exc).__name__}: {exc}")
        return errors

    async def send_async(self, envelope: bytes) -> int:
        return int(await self._router.send.remote(envelope))

    async def wait_ready(self, timeout_s: float) -> bool:
        """Until the router answers again (Ray restarting it), at most ``timeout_s``."""
        import asyncio

        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self._router.whoami.remote()
                return True
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.5)


class Audited:
    """An enrolled actor with an identity and an audit outbox flushed in batches."""

    def __init__(self, seed: bytes, roster_json: str, auditor: Any) -> None:
        self.identity = Identity.from_seed(seed)
        self.roster = Roster.from_json(roster_json)
        self.audit = AuditRecorder(self.identity)
        self._auditor = resolve(auditor)
        self._last_flush = time.monotonic()
        self._inflight: list[tuple[Any, list[AuditEvent]]] = []  # (append ref, its events)
        self.audit_refusals = 0
        self.last_audit_error = ""

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def maybe_flush(self) -> None:
        now = time.monotonic()
        if len(self.audit) >= AUDIT_FLUSH_EVENTS or now - self._last_flush > AUDIT_FLUSH_S:
            self.flush_audit()

    def _reclaim(self) -> None:
        """Events of earlier flushes the auditor refused (e.g. StoreBackpressure) go back to the
        front of the buffer, to be offered again: a refused batch is kept, never dropped."""
        if not self._inflight:
            return
        import ray

        refs = [ref for ref, _ in self._inflight]
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        kept, refused = [], []
        for ref, events in self._inflight:
            if ref not in done:
                kept.append((ref, events))
                continue
            try:
                ray.get(ref, timeout=0)
            except Exception as exc:  # the auditor's refusal, re-raised by Ray
                refused.extend(events)
                self.audit_refusals += 1
                self.last_audit_error = f"{type(exc).__name__}: {exc}"
        self._inflight = kept
        if refused:
            self.audit.restore(refused)

    def flush_audit(self) -> int:
        """Hand buffered events to the auditor; returns how many were handed over.

        The append is not awaited, but its result is kept: a batch the auditor refused is put
        back in the buffer on the next flush and offered again.
        """
        self._last_flush = time.monotonic()
        self._reclaim()
        events = self.audit.drain()
        if events and self._auditor is not None:
            self._inflight.append((self._auditor.append.remote(events), events))
        return len(events)

    def sync_audit(self) -> int:
        """Flush and wait until the auditor has chained the events (used at shutdown).

        Raises the auditor's error (e.g. StoreBackpressure) with the events still buffered.
        """
        import ray

        self._last_flush = time.monotonic()
        if self._inflight:
            refs = [ref for ref, _ in self._inflight]
            ray.wait(refs, num_returns=len(refs))
        self._reclaim()
        events = self.audit.drain()
        if events and self._auditor is not None:
            try:
                ray.get(self._auditor.append.remote(events))
            except BaseException:
                self.audit.restore(events)
                raise
        return len(events)

    def audit_pending(self) -> int:
        """Events not yet known to be chained: buffered plus appends still in flight."""
        return len(self.audit) + sum(len(events) for _, events in self._inflight)


class Node(Audited):
    """An actor that also sends: seal-and-send through the router."""

    def __init__(self, seed: bytes, roster_json: str, router: Any, auditor: Any) -> None:
        super().__init__(seed, roster_json, auditor)
        self.transport = RouterTransport(router)

    def seal(self, msg: Message, recipients: list[str], round_: int) -> bytes:
        return seal(self.identity, msg.TYPE, recipients, round_, msg.to_payload())

    def send(self, msg: Message, recipients: list[str], round_: int) -> bytes:
        envelope = self.seal(msg, recipients, round_)
        self.transport.send(envelope)
        return envelope

    def post(self, msg: Message, recipients: list[str], round_: int) -> bytes:
        envelope = self.seal(msg, recipients, round_)
        self.transport.post(envelope)
        return envelope

