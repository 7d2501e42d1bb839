"""The oracle's ASGI edge, in front of routing: the access policy and the body-size limit.

Plain ASGI (no Starlette, no Ray): :class:`AccessGuard` answers 401, 429 or 503 by the rules
of :mod:`medimesh.access` before a request reaches a route; :class:`BodyLimit` answers 413 for
a body over the limit, by ``Content-Length`` or while a chunked body streams in.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from medimesh.access import (
    EXEMPT_PATHS,
    AccessPolicy,
    RateLimiter,
    StreamSlots,
    bearer_token,
    limit_group,
    token_matches,
)
from medimesh.oracle.config import MAX_BODY_BYTES

__all__ = ["ASGIApp", "AccessGuard", "BodyLimit", "body_limit"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AccessGuard:
    """The access policy (medimesh.access) at the ASGI edge: 401, 429 or 503 before routing.

    The client address is the ASGI ``client`` (Serve's proxy passes it through; uvicorn
    rewrites it from X-Forwarded-For only for peers in FORWARDED_ALLOW_IPS, 127.0.0.1 by
    default).
    """

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self._app = app
        self.policy = policy
        self.limiters = {g: RateLimiter(lim) for g, lim in policy.limits.items()}
        self.streams = StreamSlots(policy.max_streams, policy.max_streams_per_client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
        if root and path.startswith(root):  # mounted under a prefix: judge the app's path
            path = path[len(root):] or "/"
        client = scope.get("client")
        who = str(client[0]) if client else "unknown"
        if self.policy.token is not None and path not in EXEMPT_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not token_matches(self.policy.token, bearer_token(auth.decode("latin-1"))):
                await _refuse(send, 401, "missing or wrong API token: send 'Authorization: "
                              "Bearer <token>' (the token `medimesh serve` printed or wrote to "
                              "its token file; clients read $MEDIMESH_API_TOKEN)",
                              [(b"www-authenticate", b'Bearer realm="medimesh"')])
                return
        group = limit_group(path)
        limiter = self.limiters.get(group) if group is not None else None
        if limiter is not None:
            wait = limiter.take(who, time.monotonic())
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await _refuse(send, 429, f"rate limit: too many {group} requests from this "
                              f"address; retry after {retry} s",
                              [(b"retry-after", str(retry).encode())])
                return
        if group != "events" or scope.get("method") != "GET":
            await self._app(scope, receive, send)
            return
        refused = self.streams.acquire(who)
        if refused is not None:
            await _refuse(send, 503, refused, [(b"retry-after", b"5")])
            return
        try:
            await self._app(scope, receive, send)
        finally:
            self.streams.release(who)


async def _refuse(send: Send, status: int, detail: str,
                  headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})



class BodyLimit:
    """Starlette middleware class around :func:`body_limit`."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self._inner = body_limit(app, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inner(scope, receive, send)


def body_limit(app: ASGIApp, limit: int) -> ASGIApp:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    async def reject(send: Send) -> None:
        await _refuse(send, 413, f"request body exceeds {limit} bytes", [])

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = True
            if too_big:
                await reject(send)
                return
            await app(scope, receive, send)
            return
        # No length (chunked): buffer up to the limit, then replay.
        chunks: list[bytes] = []
        size, more = 0, scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await reject(send)
                return
            chunks.append(chunk)
            more = bool(msg.get("more_body", False))
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay if chunks else receive, send)

    return middleware
