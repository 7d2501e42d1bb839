"""The two seams between a node and its AXL transport, each in ONE function.

* :func:`connect`: a node's client to an AXL node API (``--axl URL``, ``--axl-pin PEER_ID``).
* :func:`start_front`: the consortium's AXL front for its remote hospitals, as a background
  thread in the operator's process.

Both speak TLS whose certificate key is the router's Ed25519 identity (the client pins the
roster's router peer id) and sign ``/recv`` and ``/topology`` with the node's own key
(``medimesh.actors.axl_front``, ``medimesh.axl_auth``, docs/axl.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medimesh.axl import AxlTransport
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Roster

if TYPE_CHECKING:
    from medimesh.actors.axl_front import RunningFront

__all__ = ["RunningFront", "connect", "node_url", "parse_listen", "start_front"]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``--axl-listen``); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--axl-listen must be HOST:PORT, got {text!r}")
    return host, int(port)


def start_front(
    router: Any, peers: Sequence[str], *, host: str, port: int, tls_seed: bytes,
    roster: Roster,
) -> RunningFront:
    """Serve the AXL API for ``peers`` over the router actor ``router`` on ``host:port``, over
    TLS whose certificate key is ``tls_seed``'s (the router's identity: clients pin the
    roster's router peer id), refusing unsigned ``/recv`` and ``/topology`` and senders
    outside ``roster``."""
    from medimesh.actors.axl_front import serve_front

    return serve_front(router, peers, host=host, port=port, tls_seed=tls_seed, roster=roster)


def connect(url: str, identity: Identity, pin: str | None) -> AxlTransport:
    """The node's AXL client: ``identity`` signs its ``/recv`` and ``/topology`` requests;
    over https, ``pin`` is the router peer id the front's certificate must carry (checked
    before the first request; a mismatch names both keys)."""
    return AxlTransport(node_url(url, identity.peer_id), identity=identity, pin=pin,
                        timeout=30.0)


def node_url(url: str, peer_id: str) -> str:
    """The front serves each of its nodes at ``URL/<peer id>/send|recv|topology``."""
    base = url.rstrip("/")
    return base if base.endswith("/" + peer_id) else f"{base}/{peer_id}"
