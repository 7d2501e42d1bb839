"""HTTP shell of the AXL front: Starlette routes over :class:`medimesh.axl_front.AxlFront`.

Run next to a consortium so agents outside Ray join through the router:
``python -m medimesh.actors.axl_front --address auto --pub cleveland.pub --port 9002``.
Each served peer gets a router mailbox while the front runs (detached, AXL's 502, when it
stops). The API is AXL's at ``/{peer_id}/send|recv|topology`` (also at ``/send|recv|topology``
for a single peer, for an unmodified AXL client). ``/send`` takes only envelopes the node's own
key signed, from roster members; ``/recv`` and ``/topology`` need a request signed by the
mailbox owner (``medimesh.axl_auth``). ``--tls-key ROUTER.key`` serves TLS 1.3 with the
router's key, which clients pin from the roster (``medimesh.tls``); see docs/axl.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from medimesh.axl import TO_HEADER
from medimesh.axl_auth import RequestAuth, SignedRequest
from medimesh.axl_front import AxlFront, Reply
from medimesh.axl_longpoll import while_connected
from medimesh.errors import ConfigError, MediMeshError
from medimesh.identity import Roster
from medimesh.tls import server_context
from medimesh.wire import MAX_ENVELOPE_BYTES

__all__ = ["RayRouterPort", "RunningFront", "build_front_app", "find_router", "main",
           "serve_front"]

NAMESPACE = "medimesh"
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RayRouterPort:
    """The router actor behind :class:`~medimesh.axl_front.RouterPort` (awaits its refs)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def send(self, envelope: bytes) -> int:
        return int(await _unwrap(self.handle.send.remote(envelope)))

    async def recv(self, peer_id: str) -> tuple[str, bytes] | None:
        item = await _unwrap(self.handle.recv.remote(peer_id))
        return None if item is None else (str(item[0]), bytes(item[1]))

    async def recv_batch(self, peer_ids: Sequence[str]) -> list[tuple[str, str, bytes]]:
        return list(await _unwrap(self.handle.recv_batch.remote(list(peer_ids))))

    async def topology(self) -> dict[str, Any]:
        return dict(await _unwrap(self.handle.topology.remote()))

    async def detach(self, peers: Sequence[str]) -> None:
        await asyncio.gather(*(self.handle.unregister.remote(p) for p in peers))


async def _unwrap(ref: Any) -> Any:
    """Await a router call; re-raise the router's own refusal without Ray's remote traceback."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MediMeshError):
            raise exc.cause from None
        raise


async def _answer(call: Awaitable[Reply]) -> Response:
    """The front's reply as HTTP; a dead router is 503, not a stack trace."""
    import ray

    try:
        reply = await call
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        reply = Reply.text(503, f"the MediMesh router is unavailable ({type(exc).__name__})")
    return Response(reply.body, reply.status, dict(reply.headers), reply.media_type)


def build_front_app(
    router: Any,
    peers: Sequence[str],
    *,
    roster: Roster | None = None,
    require_signed: bool = True,
) -> Starlette:
    """The AXL API for ``peers`` over the router actor ``router`` (a Ray actor handle).

    ``roster``: the front's copy (serves and takes ``/send`` from members only).
    ``require_signed``: ``/recv`` and ``/topology`` need a request signed by the mailbox
    owner (:mod:`medimesh.axl_auth`); off only for an unmodified AXL client on loopback.
    """
    port = RayRouterPort(router)
    front = AxlFront(port, peers, roster=roster, auth=RequestAuth() if require_signed else None)
    single = front.peers[0] if len(front.peers) == 1 else None

    def peer_of(request: Request) -> str:
        return str(request.path_params.get("peer", single or "")).lower()

    def signed(request: Request) -> SignedRequest:
        return SignedRequest(request.method, request.url.path, request.headers)

    async def send(request: Request) -> Response:
        if int(request.headers.get("content-length") or 0) > MAX_ENVELOPE_BYTES:
            return PlainTextResponse("message exceeds the 16 MiB cap\n", 413)  # before reading
        body = await request.body()
        return await _answer(front.send(peer_of(request), request.headers.get(TO_HEADER), body))

    async def recv(request: Request) -> Response:  # a client gone mid-wait gets nothing popped
        work = front.recv(peer_of(request), signed(request))
        return await _answer(while_connected(work, request.receive, Reply(204)))

    async def topology(request: Request) -> Response:
        return await _answer(front.topology(peer_of(request), signed(request)))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(_attach, router, front.peers)  # NotEnrolled: not a member
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # the router may already be gone
                await port.detach(front.peers)

    routes = [
        Route("/{peer}/send", send, methods=["POST"]),
        Route("/{peer}/recv", recv, methods=["GET"]),
        Route("/{peer}/topology", topology, methods=["GET"]),
    ]
    if single is not None:
        routes += [
            Route("/send", send, methods=["POST"]),
            Route("/recv", recv, methods=["GET"]),
            Route("/topology", topology, methods=["GET"]),
        ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.front = front
    return app


@dataclass
class RunningFront:
    """A front serving in a background thread: ``url`` to give clients, ``pin`` (the peer id
    its TLS certificate carries; None without TLS), ``stop()`` to detach and shut down."""

    url: str
    pin: str | None
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def serve_front(
    router: Any, peers: Sequence[str], *, host: str = "127.0.0.1", port: int = 0,
    tls_seed: bytes | None, roster: Roster | None, require_signed: bool = True,
    start_timeout_s: float = 30.0,
) -> RunningFront:
    """Serve the front for ``peers`` in a daemon thread of this process (``port=0``: any free
    port). ``tls_seed`` (the router's identity seed) turns on TLS with the certificate the
    roster pins; the peers are attached before this returns, so a non-member fails here."""
    import uvicorn

    from medimesh.identity import Identity

    _attach(router, peers)  # NotEnrolled: clear, up front
    app = build_front_app(router, peers, roster=roster, require_signed=require_signed)
    config = _uvicorn_config(app, host, port, tls_seed)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="medimesh-axl-front", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"the AXL front did not start on {host}:{port}")
        time.sleep(0.02)
    bound = int(server.servers[0].sockets[0].getsockname()[1])
    scheme = "http" if tls_seed is None else "https"
    pin = None if tls_seed is None else Identity.from_seed(tls_seed).peer_id
    shown = f"[{host}]" if ":" in host else host
    return RunningFront(f"{scheme}://{shown}:{bound}", pin, server, thread)


def _attach(router: Any, peers: Sequence[str]) -> None:
    """Register mailboxes for ``peers`` (blocking), re-raising the router's own refusal."""
    import ray

    try:
        ray.get([router.register.remote(p, None) for p in peers])
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MediMeshError):
            raise exc.cause from None
        raise


def _uvicorn_config(app: Starlette, host: str, port: int, tls_seed: bytes | None) -> Any:
    import uvicorn

    factory = None
    if tls_seed is not None:
        seed = tls_seed

        def factory(_config: Any, _default: Any) -> ssl.SSLContext:
            return server_context(seed)

    return uvicorn.Config(app, host=host, port=port, log_level="warning",
                          ssl_context_factory=factory)


def find_router(name: str | None = None, namespace: str = NAMESPACE) -> Any:
    """The router actor by name, or the only ``router@…`` actor in the namespace."""
    import ray

    if name is None:
        names = sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace and a["name"].startswith("router@")
        )
        if len(names) != 1:
            found = ", ".join(names) or "none"
            raise ConfigError(f"pass --router: {found} router actors in namespace {namespace}")
        name = names[0]
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ConfigError(f"no actor {name!r} in namespace {namespace}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Attach to a running Ray cluster and serve the AXL API for the given peers."""
    from medimesh.keys import load_key, load_roster, parse_peer_id, read_pub

    p = argparse.ArgumentParser(prog="python -m medimesh.actors.axl_front", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--router", default=None, help="router actor name (default: the only one)")
    p.add_argument("--peer-id", action="append", default=[], help="a peer to serve (repeat)")
    p.add_argument("--pub", action="append", default=[], type=Path,
                   help="a peer's NAME.pub file (repeat)")
    p.add_argument("--roster", type=Path, default=None,
                   help="the roster copy: serve and accept /send from its members only")
    p.add_argument("--tls-key", type=Path, default=None,
                   help="serve TLS with this .key (the router's, whose peer id clients pin)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="let unsigned requests drain mailboxes (loopback without TLS only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002, help="AXL's default API port")
    args = p.parse_args(argv)
    try:
        peers = [parse_peer_id(x) for x in args.peer_id] + [read_pub(f) for f in args.pub]
        if not peers:
            raise ConfigError("name at least one peer with --peer-id or --pub")
        if args.allow_unsigned and (args.tls_key or args.host not in _LOOPBACK):
            raise ConfigError("--allow-unsigned only on a loopback host without --tls-key")
        roster = None if args.roster is None else load_roster(args.roster)
        tls_key = None if args.tls_key is None else load_key(args.tls_key)
        import ray
        import uvicorn

        ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False,
                 configure_logging=False)
        router = find_router(args.router)
        _attach(router, peers)  # an unenrolled peer fails here, clearly
        app = build_front_app(router, peers, roster=roster,
                              require_signed=not args.allow_unsigned)
        if tls_key is not None:
            print(f"axl_front: TLS on; clients pin {tls_key.peer_id}", file=sys.stderr)
        tls_seed = None if tls_key is None else tls_key.seed
        uvicorn.Server(_uvicorn_config(app, args.host, args.port, tls_seed)).run()
    except MediMeshError as exc:
        print(f"axl_front: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
