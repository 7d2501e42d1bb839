"""The AXL node API served by MediMesh's router, so agents outside Ray can join.

Each peer served by a front is a *node* in AXL's sense: ``/send`` accepts only envelopes that
peer signed (a node speaks only as itself), ``/recv`` drains that peer's mailbox at the router,
``/topology`` names it as ``our_public_key``. The router still decides everything else:
enrolment, reachability (502), faults and counters; it never sees a plaintext, and neither does
the front (it reads the envelope's signed header, as the router does).

AXL sends one destination per request, so a client posts a multi-recipient envelope once per
recipient. The router delivers an envelope to all its recipients in one call, so the front
routes each envelope once and answers the other recipients' posts from a short memory of
digests. This module is the request logic only; ``medimesh.actors.axl_front`` is the HTTP
and Ray shell around it.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from medimesh.axl import FROM_HEADER, SENT_HEADER
from medimesh.axl_auth import AuthRefused, RequestAuth, SignedRequest
from medimesh.axl_longpoll import WAIT_HEADER, Waiters, wait_seconds
from medimesh.errors import EnvelopeError, NotEnrolled, PeerUnreachable
from medimesh.identity import Roster
from medimesh.wire import MAX_ENVELOPE_BYTES, digest, inspect

__all__ = ["AxlFront", "Reply", "RouterPort", "topology_doc"]

_HEX = frozenset("0123456789abcdef")


class RouterPort(Protocol):
    """The three router calls a front needs (the Ray shell awaits the actor's methods)."""

    async def send(self, envelope: bytes) -> int: ...

    async def recv(self, peer_id: str) -> tuple[str, bytes] | None: ...

    async def recv_batch(self, peer_ids: Sequence[str]) -> list[tuple[str, str, bytes]]:
        """At most one message for each of ``peer_ids``: (peer, sender, envelope)."""
        ...

    async def topology(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer, framework-free: status, body, extra headers and media type."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    media_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, status: int, message: str) -> Reply:
        return cls(status, (message + "\n").encode())

    @classmethod
    def unauthorized(cls, reason: str) -> Reply:
        """401 with a JSON reason, naming the scheme a client must use."""
        body = _json({"error": "unauthorized", "reason": reason})
        return cls(401, body, (("WWW-Authenticate", "MediMesh-Ed25519"),), "application/json")


def _valid_peer_id(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX


class AxlFront:
    """AXL's ``/send``, ``/recv`` and ``/topology`` for the peers bound to this front."""

    def __init__(
        self,
        router: RouterPort,
        peers: Iterable[str],
        *,
        roster: Roster | None = None,
        auth: RequestAuth | None = None,
        remember: int = 4096,
    ) -> None:
        """``roster``: the front's copy; it serves only its members and takes ``/send`` only
        from them. ``auth``: required proof of key possession on ``/recv`` and ``/topology``
        (None: open, as a bare AXL node on loopback)."""
        self._router = router
        self.peers: tuple[str, ...] = tuple(dict.fromkeys(peers))
        for p in self.peers:
            if not _valid_peer_id(p):
                raise ValueError(f"not a peer id: {p!r}")
            if roster is not None and p not in roster:
                raise NotEnrolled(
                    f"peer {p[:12]}… is not in the roster: a front serves members only"
                )
        self.roster = roster
        self.auth = auth
        self._remember = remember
        self._routed: OrderedDict[str, int] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[int]] = {}
        self._waiters = Waiters(router.recv_batch)

    def _refused(self, peer: str, request: SignedRequest | None) -> Reply | None:
        """401 unless ``request`` proves possession of ``peer``'s key (when auth is on)."""
        if self.auth is None:
            return None
        if request is None:
            return Reply.unauthorized("unsigned request")
        try:
            self.auth.check(request, peer)
        except AuthRefused as exc:
            return Reply.unauthorized(str(exc))
        return None

    def _unknown(self, peer: str) -> Reply | None:
        if peer in self.peers:
            return None
        return Reply.text(404, f"this front serves no node with peer id {peer[:16]}…")

    async def send(self, peer: str, destination: str | None, body: bytes) -> Reply:
        """``POST /send`` from node ``peer``: route the envelope, once, through the router."""
        if (missing := self._unknown(peer)) is not None:
            return missing
        if not destination:
            return Reply.text(400, "Missing X-Destination-Peer-Id header")
        destination = destination.strip().lower()
        if not _valid_peer_id(destination):
            return Reply.text(400, "Invalid destination peer ID")
        if len(body) > MAX_ENVELOPE_BYTES:
            return Reply.text(413, "message exceeds the 16 MiB cap")
        try:
            header = inspect(body)
        except EnvelopeError as exc:
            return Reply.text(400, f"not a valid MediMesh envelope: {exc}")
        if self.roster is not None and header.sender not in self.roster:
            return Reply.text(403, f"sender {header.sender[:12]}… is not in the roster")
        if header.sender != peer:
            return Reply.text(
                403,
                f"envelope is signed by {header.sender[:12]}…, but this node is {peer[:12]}…: "
                "a node sends only as itself",
            )
        if destination not in header.recipients:
            return Reply.text(400, f"{destination[:12]}… is not a recipient of this envelope")
        try:
            await self._route_once(digest(body), body)
        except PeerUnreachable as exc:
            return Reply.text(502, f"Failed to reach peer: {exc}")
        except NotEnrolled as exc:
            return Reply.text(403, str(exc))
        except EnvelopeError as exc:
            return Reply.text(400, f"router refused the envelope: {exc}")
        return Reply(200, headers=((SENT_HEADER, str(len(body))),),
                     media_type="application/octet-stream")

    async def _route_once(self, key: str, envelope: bytes) -> int:
        """Route through the router unless this envelope was routed (or is being routed)."""
        if key in self._routed:
            self._routed.move_to_end(key)
            return self._routed[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._router.send(envelope))
            self._inflight[key] = task
            try:
                n = await asyncio.shield(task)
            finally:
                del self._inflight[key]
            self._routed[key] = n  # only successes: a refused envelope may be retried
            while len(self._routed) > self._remember:
                self._routed.popitem(last=False)
            return n
        return await asyncio.shield(task)

    async def recv(self, peer: str, request: SignedRequest | None = None) -> Reply:
        """``GET /recv`` for node ``peer``: one envelope from its mailbox, or 204. With
        ``X-MediMesh-Wait: S`` an empty mailbox holds the request up to S seconds
        (medimesh.axl_longpoll); a plain AXL client never sends it and gets AXL's answer."""
        if (missing := self._unknown(peer)) is not None:
            return missing
        if (refused := self._refused(peer, request)) is not None:
            return refused
        item = self._waiters.take_held(peer) or await self._router.recv(peer)
        wait = wait_seconds(request.headers.get(WAIT_HEADER)) if request is not None else 0.0
        if item is None and wait > 0:
            item = await self._waiters.wait(peer, wait)
        if item is None:
            return Reply(204)
        sender, envelope = item
        return Reply(200, envelope, ((FROM_HEADER, sender),), "application/octet-stream")

    async def topology(self, peer: str, request: SignedRequest | None = None) -> Reply:
        """``GET /topology`` for node ``peer``: the router's view in AXL's shape."""
        if (missing := self._unknown(peer)) is not None:
            return missing
        if (refused := self._refused(peer, request)) is not None:
            return refused
        return Reply(200, _json(topology_doc(peer, await self._router.topology())),
                     media_type="application/json")


def topology_doc(peer: str, router_topology: dict[str, Any]) -> dict[str, Any]:
    """AXL's topology document for ``peer``: every other reachable member is a peer, up."""
    hub = str(router_topology.get("our_public_key", ""))
    return {
        "our_ipv6": "",
        "our_public_key": peer,
        "peers": [
            {"uri": "medimesh-router", "up": True, "inbound": False, "public_key": p,
             "root": hub, "port": 0, "coords": []}
            for p in router_topology.get("peers", [])
            if p != peer
        ],
        "tree": list(router_topology.get("tree", [])),
    }


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()
