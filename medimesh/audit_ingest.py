"""Audit events that arrive over the wire: a remote node's signed events, checked before chaining.

A hospital outside Ray cannot call the auditor; it seals an :class:`~medimesh.protocol.AuditEvents`
batch to the auditor's peer id and sends it through the AXL front like any message. The auditor
chains the batch only if all of these hold, else it chains none of it and records why:

* the envelope opens with the auditor's key (signed by its sender, sealed to the auditor);
* it is an ``audit_events`` message from a member of the auditor's roster;
* every event names the envelope's sender as its actor (a node speaks only for itself);
* every event's own signature verifies (so the chain keeps the actor's proof, not the envelope's).

Pure: no I/O; the auditor's Ray shell (``actors/auditor.py``) appends what :func:`ingest` accepts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import BadSignatureError

from medimesh.audit import AuditEvent, sign_event
from medimesh.errors import EnvelopeError, MalformedPayload
from medimesh.identity import Identity, verify_key
from medimesh.protocol import AuditEvents, decode
from medimesh.wire import digest, open_envelope

__all__ = ["MAX_EVENTS", "Ingested", "event_from_json", "event_to_json", "ingest"]

MAX_EVENTS = 4096
"""Events one batch may carry (a node sends at most a few hundred per flush)."""

_FIELDS = {"at": float, "actor": str, "event": str, "round": int, "subject": str,
           "body": dict, "signature": str}


@dataclass(frozen=True, slots=True)
class Ingested:
    """What the auditor does with one envelope: chain ``accepted``, or audit ``refused``."""

    accepted: list[AuditEvent] = field(default_factory=list)
    refused: str = ""  # the reason; "" when accepted
    sender: str = ""
    digest: str = ""

    def refusal_body(self) -> dict[str, Any]:
        """The body of the auditor's own ``audit_events_refused`` event."""
        return {"sender": self.sender, "reason": self.refused, "digest": self.digest}

    def to_chain(self, writer: Identity) -> list[AuditEvent]:
        """What the auditor chains: the accepted events, or its own signed refusal."""
        if not self.refused:
            return self.accepted
        return [sign_event(writer, "audit_events_refused", -1, self.sender, self.refusal_body())]


def event_to_json(event: AuditEvent) -> dict[str, Any]:
    return {k: getattr(event, k) for k in _FIELDS}


def event_from_json(doc: dict[str, Any]) -> AuditEvent:
    """An :class:`AuditEvent` from its JSON object; any missing or mistyped field raises."""
    if set(doc) != set(_FIELDS):
        raise MalformedPayload(f"audit event fields are {sorted(doc)}, not {sorted(_FIELDS)}")
    values: dict[str, Any] = {}
    for name, kind in _FIELDS.items():
        value = doc[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MalformedPayload(f"audit event field {name!r} must be {kind.__name__}")
        values[name] = value
    return AuditEvent(**values)


def _signed_by_actor(event: AuditEvent) -> bool:
    try:
        verify_key(event.actor).verify(event.signed_bytes(), bytes.fromhex(event.signature))
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def ingest(identity: Identity, members: Collection[str], envelope: bytes) -> Ingested:
    """Open one ``audit_events`` envelope for the auditor ``identity``; all or nothing."""
    dig = digest(envelope)
    try:
        opened = open_envelope(envelope, identity)
    except EnvelopeError as exc:
        return Ingested(refused=f"envelope: {type(exc).__name__}", digest=dig)
    sender = opened.header.sender
    if sender not in members:
        return Ingested(refused="sender is not on the roster", sender=sender, digest=dig)
    if opened.header.type != AuditEvents.TYPE:
        return Ingested(refused=f"unexpected message type {opened.header.type!r}",
                        sender=sender, digest=dig)
    try:
        docs: Sequence[dict[str, Any]] = decode(
            opened.header.type, opened.payload, AuditEvents
        ).events
        if len(docs) > MAX_EVENTS:
            raise MalformedPayload(f"{len(docs)} events in one batch (at most {MAX_EVENTS})")
        events = [event_from_json(d) for d in docs]
    except MalformedPayload as exc:
        return Ingested(refused=f"malformed: {exc}", sender=sender, digest=dig)
    for i, event in enumerate(events):
        if event.actor != sender:
            return Ingested(refused=f"event {i} names actor {event.actor[:12]}…, not the sender",
                            sender=sender, digest=dig)
        if not _signed_by_actor(event):
            return Ingested(refused=f"event {i} ({event.event}): signature does not verify",
                            sender=sender, digest=dig)
    return Ingested(accepted=events, sender=sender, digest=dig)
