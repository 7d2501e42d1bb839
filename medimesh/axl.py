"""A :class:`~medimesh.transport.Transport` over a Gensyn AXL node's local HTTP API.

AXL (github.com/gensyn-ai/axl) is a peer-to-peer node that applications reach on loopback:

* ``POST /send`` with header ``X-Destination-Peer-Id: <64 hex>`` and the raw message as body;
  200 (with ``X-Sent-Bytes``) once written to the peer, 400 for a bad peer id, 502 when the
  peer cannot be reached. One destination per request, fire-and-forget, no store-and-forward.
* ``GET /recv``: 204 when nothing is queued, else one message as the body with the sender in
  ``X-From-Peer-Id``. The node keeps a small queue and drops the oldest when it is full.
* ``GET /topology``: ``{our_ipv6, our_public_key, peers: [{public_key, up, …}], tree: […]}``.

A MediMesh envelope names several recipients, so :meth:`AxlTransport.send` posts the same
envelope once per recipient. Who sent a message is read from the envelope's signatures
(``open_envelope``), never from ``X-From-Peer-Id``: a real AXL node derives that header from the
sender's Yggdrasil address, which carries only part of the key. The same API is served by
MediMesh's own router through ``medimesh.actors.axl_front``, so this class talks to either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from medimesh.errors import MediMeshError, NotEnrolled, PeerUnreachable
from medimesh.wire import MAX_ENVELOPE_BYTES, inspect

__all__ = [
    "FROM_HEADER",
    "SENT_HEADER",
    "TO_HEADER",
    "AxlError",
    "AxlTransport",
    "Received",
    "Topology",
]

TO_HEADER = "X-Destination-Peer-Id"
FROM_HEADER = "X-From-Peer-Id"
SENT_HEADER = "X-Sent-Bytes"


class AxlError(MediMeshError):
    """The AXL node could not be reached or answered something outside its API."""


@dataclass(frozen=True, slots=True)
class Received:
    """One message from ``GET /recv``; ``from_peer`` is the node's claim, not a proof."""

    from_peer: str
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Topology:
    """``GET /topology``: our key, the public keys of the peers, and the spanning tree."""

    our_public_key: str
    peers: tuple[str, ...]
    our_ipv6: str = ""
    tree: tuple[dict[str, Any], ...] = field(default=())

    @classmethod
    def from_json(cls, doc: Any) -> Topology:
        """Accept AXL's peer objects (``{"public_key": …}``) and plain key strings alike.

        Go encodes an empty peer list as ``null``, so ``None`` is an empty list here.
        """
        if not isinstance(doc, dict) or not isinstance(doc.get("our_public_key"), str):
            raise AxlError("topology is not an AXL topology document")
        peers = []
        for p in doc.get("peers") or []:
            key = p.get("public_key") if isinstance(p, dict) else p
            if isinstance(key, str) and key:
                peers.append(key)
        tree = tuple(t for t in doc.get("tree") or [] if isinstance(t, dict))
        return cls(doc["our_public_key"], tuple(peers), str(doc.get("our_ipv6") or ""), tree)


def _detail(resp: httpx.Response) -> str:
    text = resp.text.strip()
    return text[:300] if text else resp.reason_phrase


class AxlTransport:
    """Sends and receives MediMesh envelopes through one AXL node (``base_url``).

    ``post`` waits for the local node like ``send`` does (it answers once the bytes are
    written, on loopback), but keeps refusals for :meth:`failures` instead of raising, which is
    what the actors' fire-and-forget path expects.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout)
        self._owns_client = client is None
        self._failures: list[str] = []
        self._peer_id: str | None = None

    # -- the Transport protocol ------------------------------------------------------------
    def send(self, envelope: bytes) -> int:
        """Post the envelope to each of its recipients; returns how many took it.

        Raises PeerUnreachable (after trying every recipient) when some could not be
        reached, NotEnrolled when the network refuses a peer, AxlError for anything else.
        """
        header = inspect(envelope)  # refuse to put a malformed or unsigned envelope on the wire
        if len(envelope) > MAX_ENVELOPE_BYTES:
            raise AxlError("envelope exceeds AXL's 16 MiB message cap")
        sent = 0
        unreachable: list[str] = []
        for peer in header.recipients:
            resp = self._request("POST", "/send", content=envelope, headers={TO_HEADER: peer})
            if resp.status_code == 200:
                sent += 1
            elif resp.status_code == 502:
                unreachable.append(f"{peer[:12]}… ({_detail(resp)})")
            elif resp.status_code == 403:
                raise NotEnrolled(_detail(resp))
            else:
                raise AxlError(f"/send to {peer[:12]}… answered {resp.status_code}: "
                               f"{_detail(resp)}")
        if unreachable:
            raise PeerUnreachable(
                f"sent to {sent} of {len(header.recipients)}; no route to {', '.join(unreachable)}"
            )
        return sent

    def post(self, envelope: bytes) -> None:
        try:
            self.send(envelope)
        except MediMeshError as exc:
            self._failures.append(f"{type(exc).__name__}: {exc}")

    def failures(self) -> list[str]:
        out, self._failures = self._failures, []
        return out

    # -- the rest of the AXL API -----------------------------------------------------------
    def recv(self) -> Received | None:
        """The next queued message, or ``None`` when the node answers 204."""
        resp = self._request("GET", "/recv")
        if resp.status_code == 204:
            return None
        if resp.status_code != 200:
            raise AxlError(f"/recv answered {resp.status_code}: {_detail(resp)}")
        return Received(resp.headers.get(FROM_HEADER, ""), resp.content)

    def poll(self, deliver: Callable[[bytes], object], limit: int = 100) -> int:
        """Hand up to ``limit`` queued envelopes to ``deliver`` (what the router's push does)."""
        n = 0
        while n < limit:
            msg = self.recv()
            if msg is None:
                break
            deliver(msg.envelope)
            n += 1
        return n

    def listen(
        self, deliver: Callable[[bytes], object], stop: threading.Event, idle_s: float = 0.02
    ) -> None:
        """Poll until ``stop`` is set: how a node outside Ray gets its ``deliver`` calls.

        AXL has no push to applications, so an empty queue costs one loopback request per
        ``idle_s``; a busy one is drained without sleeping.
        """
        while not stop.is_set():
            if self.poll(deliver) == 0:
                stop.wait(idle_s)

    def topology(self) -> Topology:
        resp = self._request("GET", "/topology")
        if resp.status_code != 200:
            raise AxlError(f"/topology answered {resp.status_code}: {_detail(resp)}")
        try:
            doc = resp.json()
        except ValueError:
            raise AxlError("/topology did not return JSON") from None
        return Topology.from_json(doc)

    @property
    def peer_id(self) -> str:
        """This node's own public key, as its topology reports it (asked once)."""
        if self._peer_id is None:
            self._peer_id = self.topology().our_public_key
        return self._peer_id

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self._client.request(method, self._base + path, **kw)
        except httpx.HTTPError as exc:
            raise AxlError(f"cannot reach the AXL node at {self._base}: {exc}") from None

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> AxlTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AxlTransport({self._base!r})"
