"""Envelope v1: signed, end-to-end encrypted messages that a router can route but not read.

Layout (all integers big-endian)::

    magic b"MMSH" | major u8 | minor u8
    | u32 len | header (canonical JSON: type, sender, recipients, round, id, at)
    | u32 len | body:  u16 n | n x wrapped content key (Box, 72 B) | SecretBox(inner)
    | outer signature (64 B) over DOMAIN_OUTER + every byte before it

    inner = u32 len | payload | inner signature over DOMAIN_INNER + header + payload

The outer signature lets the router and the audit trail authenticate the sender from metadata
alone; the inner signature binds the plaintext to the header so a recipient can prove who wrote
it even after re-wrapping. There is one entry point that reads plaintext, :func:`open_envelope`,
and it verifies everything or raises a typed :class:`~medimesh.errors.EnvelopeError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box
from nacl.secret import SecretBox
from nacl.utils import random as nacl_random

from medimesh.errors import (
    BadMagic,
    BadSignature,
    DecryptionFailed,
    MalformedEnvelope,
    NotARecipient,
    UnsupportedVersion,
)
from medimesh.identity import Identity, verify_key

__all__ = [
    "MAGIC",
    "MAX_ENVELOPE_BYTES",
    "VERSION",
    "Header",
    "Opened",
    "digest",
    "inspect",
    "open_envelope",
    "seal",
]

MAGIC = b"MMSH"
VERSION = (1, 0)
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024  # AXL's message cap
DOMAIN_OUTER = b"medimesh/envelope-outer/v1\0"
DOMAIN_INNER = b"medimesh/envelope-inner/v1\0"
_SIG = 64
_WRAPPED = Box.NONCE_SIZE + SecretBox.KEY_SIZE + SecretBox.MACBYTES  # 72
_MAX_RECIPIENTS = 1024


@dataclass(frozen=True, slots=True)
class Header:
    """Routing metadata: visible to the router, authenticated by the outer signature."""

    type: str
    sender: str
    recipients: tuple[str, ...]
    round: int
    message_id: str
    sent_at: float
    raw: bytes

    def metadata(self) -> dict[str, object]:
        """What may be shown in feeds and logs: never payload contents."""
        return {
            "type": self.type,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "round": self.round,
            "message_id": self.message_id,
            "sent_at": self.sent_at,
        }


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified, decrypted envelope."""

    header: Header
    payload: bytes
    digest: str


def digest(envelope: bytes) -> str:
    """The SHA-256 of the whole envelope: how verdicts and provenance name a message."""
    return hashlib.sha256(envelope).hexdigest()


def _encode_header(
    type_: str, sender: str, recipients: Sequence[str], round_: int, message_id: str, at: float
) -> bytes:
    doc = {
        "at": round(at, 6),
        "id": message_id,
        "recipients": list(recipients),
        "round": round_,
        "sender": sender,
        "type": type_,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def seal(
    identity: Identity,
    type_: str,
    recipients: Sequence[str],
    round_: int,
    payload: bytes,
    *,
    message_id: str | None = None,
    now: float | None = None,
) -> bytes:
    """Sign, encrypt once with a fresh content key, and wrap that key for every recipient."""
    if not recipients:
        raise MalformedEnvelope("an envelope needs at least one recipient")
    if len(set(recipients)) != len(recipients) or len(recipients) > _MAX_RECIPIENTS:
        raise MalformedEnvelope("recipients must be distinct and at most 1024")
    mid = message_id if message_id is not None else os.urandom(16).hex()
    header = _encode_header(
        type_, identity.peer_id, recipients, round_, mid, time.time() if now is None else now
    )
    inner_sig = identity.sign(DOMAIN_INNER + header + payload)
    inner = struct.pack(">I", len(payload)) + payload + inner_sig
    content_key = nacl_random(SecretBox.KEY_SIZE)
    sealed = bytes(SecretBox(content_key).encrypt(inner))
    wrapped = b"".join(
        bytes(identity.box(r).encrypt(content_key)) for r in recipients
    )
    body = struct.pack(">H", len(recipients)) + wrapped + sealed
    unsigned = (
        MAGIC
        + bytes(VERSION)
        + struct.pack(">I", len(header))
        + header
        + struct.pack(">I", len(body))
        + body
    )
    envelope = unsigned + identity.sign(DOMAIN_OUTER + unsigned)
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise MalformedEnvelope(f"envelope of {len(envelope)} bytes exceeds the 16 MiB cap")
    return envelope


def _parse(envelope: bytes) -> tuple[Header, bytes]:
    """Parse framing and header, and verify the outer signature. Returns (header, body)."""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise MalformedEnvelope("an envelope is bytes")
    data = bytes(envelope)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise MalformedEnvelope("envelope exceeds the 16 MiB cap")
    if len(data) < 6 + 4 + 4 + _SIG:
        raise MalformedEnvelope("envelope is truncated")
    if data[:4] != MAGIC:
        raise BadMagic("not a MediMesh envelope")
    major = data[4]
    if major != VERSION[0]:
        raise UnsupportedVersion(f"envelope major version {major} is not supported")
    (hlen,) = struct.unpack_from(">I", data, 6)
    hstart = 10
    hend = hstart + hlen
    if hend + 4 > len(data) - _SIG:
        raise MalformedEnvelope("header length runs past the end")
    (blen,) = struct.unpack_from(">I", data, hend)
    bstart = hend + 4
    bend = bstart + blen
    if bend != len(data) - _SIG:
        raise MalformedEnvelope("body length does not match the envelope size")
    raw = data[hstart:hend]
    try:
        doc = json.loads(raw)
        header = Header(
            type=str(doc["type"]),
            sender=str(doc["sender"]),
            recipients=tuple(str(r) for r in doc["recipients"]),
            round=int(doc["round"]),
            message_id=str(doc["id"]),
            sent_at=float(doc["at"]),
            raw=raw,
        )
        vk = verify_key(header.sender)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise MalformedEnvelope(f"header is not valid: {exc}") from exc
    try:
        vk.verify(DOMAIN_OUTER + data[:bend], data[bend:])
    except BadSignatureError:
        raise BadSignature("outer signature does not verify") from None
    return header, data[bstart:bend]


def inspect(envelope: bytes) -> Header:
    """Authenticate the sender and read routing metadata without touching the payload."""
    return _parse(envelope)[0]


def open_envelope(envelope: bytes, identity: Identity) -> Opened:
    """Parse, verify both signatures and decrypt, or raise a typed EnvelopeError."""
    header, body = _parse(envelope)
    try:
        index = header.recipients.index(identity.peer_id)
    except ValueError:
        raise NotARecipient("this envelope is not addressed to us") from None
    if len(body) < 2:
        raise MalformedEnvelope("body is truncated")
    (count,) = struct.unpack_from(">H", body, 0)
    if count != len(header.recipients):
        raise MalformedEnvelope("wrapped-key count does not match the recipients")
    start = 2 + index * _WRAPPED
    sealed_at = 2 + count * _WRAPPED
    if sealed_at > len(body):
        raise MalformedEnvelope("wrapped keys run past the end")
    try:
        content_key = identity.box(header.sender).decrypt(body[start : start + _WRAPPED])
        inner = SecretBox(content_key).decrypt(body[sealed_at:])
    except (CryptoError, ValueError):
        raise DecryptionFailed("authenticated decryption failed") from None
    if len(inner) < 4 + _SIG:
        raise MalformedEnvelope("inner message is truncated")
    (plen,) = struct.unpack_from(">I", inner, 0)
    if 4 + plen + _SIG != len(inner):
        raise MalformedEnvelope("inner payload length is inconsistent")
    payload = inner[4 : 4 + plen]
    try:
        verify_key(header.sender).verify(DOMAIN_INNER + header.raw + payload, inner[4 + plen :])
    except BadSignatureError:
        raise BadSignature("inner signature does not verify") from None
    return Opened(header=header, payload=payload, digest=digest(bytes(envelope)))
