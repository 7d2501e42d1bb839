"""Long-poll for the AXL front's ``/recv``: hold a request until its mailbox has a message.

AXL has no push to applications, so a node polls ``GET /recv``. Polled every few milliseconds
by every node, the front asks the router once per poll, and on a 2-core machine ten polling
hospitals cost the front and the router most of a core. A MediMesh client may instead send
``X-MediMesh-Wait: SECONDS``: the front holds the request up to that long (at most
:data:`MAX_WAIT_S`) and answers as soon as a message is there, and it asks the router about
*all* waiting nodes in ONE call per tick (:meth:`RouterPort.recv_batch`). A real AXL node
ignores the header and answers 204 at once; the client then falls back to sleeping between
polls (``medimesh.axl.AxlTransport.listen``), so swapping the emulation for AXL stays a
configuration change.

The router's mailbox stays the one bounded queue (AXL's 100, drop-oldest, audited): the front
pops a message only for a node that is waiting for it. A message popped for a request whose
wait ended in the same instant is held here and served to that node's next ``/recv`` first.
Pure asyncio, no Ray or HTTP: ``medimesh.actors.axl_front`` wires the router in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["MAX_WAIT_S", "TICK_S", "WAIT_HEADER", "Waiters", "wait_seconds", "while_connected"]

WAIT_HEADER = "X-MediMesh-Wait"
MAX_WAIT_S = 5.0
TICK_S = 0.005

Item = tuple[str, bytes]  # (sender, envelope)
BatchRecv = Callable[[Sequence[str]], Awaitable[list[tuple[str, str, bytes]]]]


def wait_seconds(value: str | None) -> float:
    """The wait a request asks for, clamped to [0, MAX_WAIT_S]; anything unreadable is 0."""
    try:
        wait = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return min(max(wait, 0.0), MAX_WAIT_S) if wait == wait else 0.0


class Waiters:
    """Requests waiting for their node's next message, served by one pump task."""

    def __init__(self, recv_batch: BatchRecv, tick_s: float = TICK_S) -> None:
        self._recv_batch = recv_batch
        self._tick = tick_s
        self._waiting: dict[str, list[asyncio.Future[Item]]] = {}
        self._held: dict[str, deque[Item]] = {}
        self._pump: asyncio.Task[None] | None = None

    def take_held(self, peer: str) -> Item | None:
        """A message already popped for ``peer`` whose request had gone (served first)."""
        held = self._held.get(peer)
        if not held:
            return None
        item = held.popleft()
        if not held:
            del self._held[peer]
        return item

    async def wait(self, peer: str, timeout_s: float) -> Item | None:
        """The next message for ``peer`` within ``timeout_s``, else None (the front's 204)."""
        if (item := self.take_held(peer)) is not None:
            return item
        fut: asyncio.Future[Item] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(peer, []).append(fut)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            return fut.result() if fut.done() and fut.exception() is None else None
        except asyncio.CancelledError:  # the request went away: keep what was popped for it
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._held.setdefault(peer, deque()).appendleft(fut.result())
            raise
        finally:
            futures = self._waiting.get(peer, [])
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiting.pop(peer, None)

    async def _run(self) -> None:
        """Ask the router for every waiting node at once, each tick, while anyone waits."""
        while self._waiting:
            peers = [p for p, futures in self._waiting.items() if futures]
            try:
                items = await self._recv_batch(peers)
            except Exception as exc:  # the router is gone: every waiter gets the error
                for futures in self._waiting.values():
                    for fut in futures:
                        if not fut.done():
                            fut.set_exception(exc)
                self._waiting.clear()
                return
            for peer, sender, envelope in items:
                waiter = next((f for f in self._waiting.get(peer, []) if not f.done()), None)
                if waiter is None:
                    self._held.setdefault(peer, deque()).append((sender, envelope))
                else:
                    waiter.set_result((sender, envelope))
            await asyncio.sleep(self._tick)


async def while_connected(work: Awaitable[T], receive: Callable[[], Awaitable[Mapping[str, Any]]],
                          gone: T) -> T:
    """``work``'s result, unless the HTTP client disconnects first (ASGI ``receive`` says
    ``http.disconnect``): then ``work`` is cancelled — a message popped for it is held for the
    node's next request, not written to a dead socket — and ``gone`` is returned."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(receive))
    done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return gone


async def _disconnect(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    while (await receive()).get("type") != "http.disconnect":
        pass
