"""Proof of key possession for the AXL front's ``/recv`` and ``/topology``.

A client signs each request with its own Ed25519 identity. The signed string is domain
separated and canonical::

    medimesh/axl-request/v1 \\n METHOD \\n PATH \\n PEER \\n TIME \\n NONCE \\n sha256(body)

and travels in four headers (``X-MediMesh-Peer``, ``-Time``, ``-Nonce``, ``-Signature``). The
front accepts a request only when the signature verifies under the peer's key, the peer owns
the mailbox it asks for, the time is within ±30 s of the front's clock, and the nonce was not
seen in that window (a captured request cannot be replayed). Pure logic; the clock is passed in.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError

from medimesh.errors import MediMeshError
from medimesh.identity import Identity, verify_key

__all__ = [
    "DOMAIN",
    "NONCE_HEADER",
    "PEER_HEADER",
    "SIGNATURE_HEADER",
    "TIME_HEADER",
    "WINDOW_S",
    "AuthRefused",
    "RequestAuth",
    "SignedRequest",
    "canonical",
    "sign_request",
]

DOMAIN = "medimesh/axl-request/v1"
PEER_HEADER = "X-MediMesh-Peer"
TIME_HEADER = "X-MediMesh-Time"
NONCE_HEADER = "X-MediMesh-Nonce"
SIGNATURE_HEADER = "X-MediMesh-Signature"
WINDOW_S = 30.0
_HEX = frozenset("0123456789abcdef")


class AuthRefused(MediMeshError):
    """A request without a valid proof of key possession (the front answers 401)."""


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What the front checks: the request line, its headers and body."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""


def canonical(method: str, path: str, peer: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The bytes a request signature covers."""
    lines = (DOMAIN, method.upper(), path, peer, timestamp, nonce,
             hashlib.sha256(body).hexdigest())
    return "\n".join(lines).encode()


def sign_request(
    identity: Identity,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four headers proving ``identity`` sent this request, now."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16) if nonce is None else nonce
    sig = identity.sign(canonical(method, path, identity.peer_id, timestamp, nonce, body))
    return {
        PEER_HEADER: identity.peer_id,
        TIME_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: sig.hex(),
    }


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and set(text) <= _HEX


class RequestAuth:
    """Checks signed requests and remembers each peer's nonces of the last ``2 * window_s``.

    ``max_nonces_per_peer`` bounds that memory per peer: a peer that fills it (more than
    ~330 requests a second at the defaults) is refused until its old nonces expire, rather
    than the front forgetting a nonce that could then be replayed; other peers are unaffected.
    """

    def __init__(self, window_s: float = WINDOW_S, max_nonces_per_peer: int = 20_000) -> None:
        self.window_s = window_s
        self.max_nonces_per_peer = max_nonces_per_peer
        self._seen: dict[str, OrderedDict[str, float]] = {}  # peer -> nonce -> arrival time
        self.refused = 0

    def check(self, request: SignedRequest, owner: str, now: float | None = None) -> str:
        """The authenticated peer (== ``owner``), or AuthRefused with the reason."""
        try:
            return self._check(request, owner, time.time() if now is None else now)
        except AuthRefused:
            self.refused += 1
            raise

    def _check(self, request: SignedRequest, owner: str, now: float) -> str:
        h = request.headers
        peer = h.get(PEER_HEADER)
        timestamp = h.get(TIME_HEADER)
        nonce = h.get(NONCE_HEADER)
        signature = h.get(SIGNATURE_HEADER)
        if not (peer and timestamp and nonce and signature):
            raise AuthRefused(
                "unsigned request: /recv and /topology need X-MediMesh-Peer, -Time, -Nonce and "
                "-Signature (a request signed by the mailbox owner's key)"
            )
        peer = peer.strip().lower()
        if not _is_hex(peer, 64):
            raise AuthRefused("X-MediMesh-Peer is not a 64-hex peer id")
        if peer != owner:
            raise AuthRefused(
                f"signed by {peer[:12]}…, but this mailbox belongs to {owner[:12]}…: "
                "a peer reads only its own"
            )
        try:
            at = float(timestamp)
        except ValueError:
            raise AuthRefused("X-MediMesh-Time is not a number of seconds") from None
        if not abs(now - at) <= self.window_s:  # also refuses nan
            raise AuthRefused(
                f"request time is {at - now:+.1f} s from the front's clock "
                f"(outside ±{self.window_s:g} s)"
            )
        if not (8 <= len(nonce) <= 64 and set(nonce) <= _HEX):
            raise AuthRefused("X-MediMesh-Nonce must be 8 to 64 lowercase hex characters")
        if not _is_hex(signature, 128):
            raise AuthRefused("X-MediMesh-Signature is not a 128-hex Ed25519 signature")
        message = canonical(request.method, request.path, peer, timestamp, nonce, request.body)
        try:
            verify_key(peer).verify(message, bytes.fromhex(signature))
        except (BadSignatureError, ValueError):
            raise AuthRefused("bad request signature") from None
        seen = self._seen.setdefault(peer, OrderedDict())
        _forget(seen, now - 2 * self.window_s)  # older requests fail the time check anyway
        if nonce in seen:
            raise AuthRefused("replayed request: this nonce was already used")
        if len(seen) >= self.max_nonces_per_peer:
            raise AuthRefused("too many signed requests from this peer in the replay window; "
                              "retry shortly")
        seen[nonce] = now
        return peer


def _forget(seen: OrderedDict[str, float], horizon: float) -> None:
    """Drop nonces that arrived before ``horizon`` (kept in arrival order)."""
    while seen and next(iter(seen.values())) < horizon:
        seen.popitem(last=False)
