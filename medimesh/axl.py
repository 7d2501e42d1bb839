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

Talking to a MediMesh front across institutions: ``identity`` signs ``/recv`` and ``/topology``
(:mod:`medimesh.axl_auth`; the front refuses them unsigned), and an ``https`` URL needs ``pin``,
the roster's router peer id, whose key the front's TLS certificate must carry
(:mod:`medimesh.tls`). A real AXL node ignores the extra headers.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from medimesh.axl_auth import sign_request
from medimesh.axl_longpoll import WAIT_HEADER
from medimesh.errors import ConfigError, MediMeshError, NotEnrolled, PeerUnreachable
from medimesh.identity import Identity, Roster
from medimesh.tls import pinned_context
from medimesh.wire import MAX_ENVELOPE_BYTES, inspect

__all__ = [
    "FROM_HEADER",
    "SENT_HEADER",
    "TO_HEADER",
    "AxlError",
    "AxlTransport",
    "AxlUnauthorized",
    "Received",
    "Topology",
    "roster_pin",
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


class AxlUnauthorized(AxlError):
    """The front refused the request's proof of key possession (HTTP 401)."""


def _detail(resp: httpx.Response) -> str:
    text = resp.text.strip()
    return text[:300] if text else resp.reason_phrase


def _answer_error(call: str, resp: httpx.Response) -> AxlError:
    cls = AxlUnauthorized if resp.status_code == 401 else AxlError
    return cls(f"{call} answered {resp.status_code}: {_detail(resp)}")


def roster_pin(roster: Roster) -> str:
    """The TLS pin for a MediMesh front: the peer id of the roster's one router."""
    routers = roster.with_role("router")
    if len(routers) != 1:
        raise ConfigError(f"the roster names {len(routers)} routers; a front's pin needs one")
    return routers[0].peer_id


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
        identity: Identity | None = None,
        pin: str | None = None,
        timeout: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        """``identity`` signs ``/recv`` and ``/topology`` (a MediMesh front refuses them
        unsigned); an ``https`` URL needs ``pin``, the peer id whose key the front's TLS
        certificate must carry (the roster's router), checked before the first request."""
        self._base = base_url.rstrip("/")
        parts = urlsplit(self._base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"an AXL URL is http(s)://host:port[/path], got {base_url!r}")
        if parts.scheme == "https" and pin is None and client is None:
            raise ConfigError(
                f"{base_url} is https: pass pin=<the front's peer id> (the roster's router) so "
                "the TLS certificate can be checked; MediMesh does not trust web CAs here"
            )
        self._path = parts.path
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self._identity = identity
        self._pin = pin
        self._timeout = timeout
        self._client = client
        self._owns_client = client is None
        self._failures: list[str] = []
        self._peer_id: str | None = None if identity is None else identity.peer_id

    def _http(self) -> httpx.Client:
        """The HTTP client, made on first use (for https: after the pin is checked)."""
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self._tls:
                assert self._pin is not None
                verify = pinned_context(self._host, self._port, self._pin,
                                        timeout=self._timeout)
            self._client = httpx.Client(timeout=self._timeout, verify=verify)
        return self._client

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
            elif resp.status_code == 401:
                raise AxlUnauthorized(f"/send refused: {_detail(resp)}")
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
    def recv(self, wait_s: float = 0.0) -> Received | None:
        """The next queued message, or ``None`` when the node answers 204. ``wait_s`` > 0 asks
        a MediMesh front to hold the request until a message arrives (medimesh.axl_longpoll);
        a real AXL node ignores it and answers at once."""
        headers = {WAIT_HEADER: f"{wait_s:g}"} if wait_s > 0 else {}
        resp = self._request("GET", "/recv", signed=True, headers=headers)
        if resp.status_code == 204:
            return None
        if resp.status_code != 200:
            raise _answer_error("/recv", resp)
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
        self, deliver: Callable[[bytes], object], stop: threading.Event,
        idle_s: float = 0.002, max_idle_s: float = 0.05, long_poll_s: float = 1.0,
    ) -> None:
        """Receive until ``stop`` is set: how a node outside Ray gets its ``deliver`` calls.

        Each ``/recv`` asks to be held up to ``long_poll_s`` (a MediMesh front answers as soon
        as a message arrives, so an idle node costs one request a second). A node that answers
        204 at once (real AXL has no long-poll) is polled instead, the wait between polls
        starting at ``idle_s`` after a message and doubling up to ``max_idle_s``. ``stop`` is
        noticed within ``long_poll_s``.
        """
        wait = idle_s
        while not stop.is_set():
            asked = time.monotonic()
            msg = self.recv(wait_s=long_poll_s)
            if msg is not None:
                deliver(msg.envelope)
                wait = idle_s
            elif time.monotonic() - asked < long_poll_s / 2:  # not held: plain polling
                stop.wait(wait)
                wait = min(wait * 2, max_idle_s)

    def topology(self) -> Topology:
        resp = self._request("GET", "/topology", signed=True)
        if resp.status_code != 200:
            raise _answer_error("/topology", resp)
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

    def _request(self, method: str, path: str, *, signed: bool = False,
                 **kw: Any) -> httpx.Response:
        if signed and self._identity is not None:
            body = kw.get("content") or b""
            kw["headers"] = {**kw.get("headers", {}),
                             **sign_request(self._identity, method, self._path + path, body)}
        try:
            return self._http().request(method, self._base + path, **kw)
        except httpx.HTTPError as exc:
            raise AxlError(f"cannot reach the AXL node at {self._base}: {exc}") from None

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

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
