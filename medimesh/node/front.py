"""The two seams between a node and its AXL transport, each in ONE function.

* :func:`connect`: a node's client to an AXL node API (``--axl URL``, ``--axl-pin PEER_ID``).
* :func:`start_front`: the consortium's AXL front for its remote hospitals, as a background
  thread in the operator's process.

Today both are plain HTTP over the front of ``medimesh.actors.axl_front``; the AXL-hardening
work (TLS whose certificate key is the router's identity, signed ``/recv`` and ``/topology``)
replaces the bodies of these two functions, not their callers: ``identity`` and ``pin`` are
already passed through here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from medimesh.axl import AxlTransport
from medimesh.errors import ConfigError
from medimesh.identity import Identity

__all__ = ["RunningFront", "connect", "node_url", "parse_listen", "start_front"]


@dataclass(frozen=True, slots=True)
class RunningFront:
    """A front serving in this process: its base URL, the router peer id a client pins, and
    how to stop it (its peers become unreachable, AXL's 502)."""

    url: str
    pin: str
    stop: Callable[[], None]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``--axl-listen``); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--axl-listen must be HOST:PORT, got {text!r}")
    return host, int(port)


def start_front(
    router: Any, peers: Sequence[str], *, host: str, port: int, router_peer: str,
    timeout_s: float = 30.0,
) -> RunningFront:
    """Serve the AXL API for ``peers`` over the router actor ``router`` on ``host:port``."""
    import socket

    import uvicorn

    from medimesh.actors.axl_front import build_front_app

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = int(sock.getsockname()[1])
    app = build_front_app(router, peers)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="axl-front")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"the AXL front on {host}:{bound} did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    shown = f"[{host}]" if ":" in host else host
    return RunningFront(f"http://{shown}:{bound}", router_peer, stop)


def connect(url: str, identity: Identity, pin: str) -> AxlTransport:
    """The node's AXL client. ``identity`` signs its requests and ``pin`` is the router peer
    id the front's certificate must carry, once the front speaks TLS; over today's plain-HTTP
    front neither is used (bind the front to a private network, deploy/README.md)."""
    del pin  # the TLS / signed-request transport takes it (and signs with identity) here
    return AxlTransport(node_url(url, identity.peer_id), timeout=30.0)


def node_url(url: str, peer_id: str) -> str:
    """The front serves each of its nodes at ``URL/<peer id>/send|recv|topology``."""
    base = url.rstrip("/")
    return base if base.endswith("/" + peer_id) else f"{base}/{peer_id}"
