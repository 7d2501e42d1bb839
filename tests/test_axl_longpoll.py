"""The front's long-poll bookkeeping, without Ray or HTTP (medimesh.axl_longpoll)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import pytest

from medimesh.axl_longpoll import MAX_WAIT_S, Waiters, wait_seconds


class Mailboxes:
    """A stand-in for the router's mailboxes (outside what is tested: the waiting logic)."""

    def __init__(self) -> None:
        self.boxes: dict[str, deque[tuple[str, bytes]]] = {}
        self.calls = 0

    async def recv_batch(self, peers: Sequence[str]) -> list[tuple[str, str, bytes]]:
        self.calls += 1
        out = []
        for p in peers:
            box = self.boxes.get(p)
            if box:
                sender, env = box.popleft()
                out.append((p, sender, env))
        return out


def test_wait_header_is_clamped_and_garbage_is_no_wait() -> None:
    assert wait_seconds(None) == 0.0 and wait_seconds("") == 0.0
    assert wait_seconds("1.5") == 1.5 and wait_seconds("-3") == 0.0
    assert wait_seconds("1e9") == MAX_WAIT_S and wait_seconds("nan") == 0.0
    assert wait_seconds("soon") == 0.0


def test_waiting_nodes_are_served_by_one_batch_per_tick() -> None:
    async def scenario() -> None:
        boxes = Mailboxes()
        waiters = Waiters(boxes.recv_batch, tick_s=0.01)
        tasks = [asyncio.create_task(waiters.wait(p, 2.0)) for p in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        calls_before = boxes.calls
        boxes.boxes["b"] = deque([("s", b"for b")])
        boxes.boxes["a"] = deque([("s", b"for a")])
        a, b = await asyncio.wait_for(asyncio.gather(tasks[0], tasks[1]), 1.0)
        assert a == ("s", b"for a") and b == ("s", b"for b")
        assert not tasks[2].done()  # c still waits: nothing came for it
        tasks[2].cancel()
        # one router call per tick serves all three waiters (not one per node per poll)
        assert boxes.calls - calls_before <= 1 + int(0.2 / 0.01)

    asyncio.run(scenario())


def test_an_empty_wait_ends_with_none_and_stops_the_pump() -> None:
    async def scenario() -> None:
        boxes = Mailboxes()
        waiters = Waiters(boxes.recv_batch, tick_s=0.01)
        assert await waiters.wait("a", 0.1) is None
        await asyncio.sleep(0.05)
        calls = boxes.calls
        await asyncio.sleep(0.1)
        assert boxes.calls == calls  # nobody waits: the router is not asked

    asyncio.run(scenario())


def test_a_message_popped_as_its_request_left_is_held_for_the_next() -> None:
    async def scenario() -> None:
        boxes = Mailboxes()
        waiters = Waiters(boxes.recv_batch, tick_s=0.01)
        task = asyncio.create_task(waiters.wait("a", 1.0))
        await asyncio.sleep(0.03)
        task.cancel()  # the client went away (its request was cut)
        boxes.boxes["a"] = deque([("s", b"kept")])
        # the pump may already have been stopped; a new waiter for another node restarts it
        other = asyncio.create_task(waiters.wait("b", 0.1))
        await other
        held = waiters.take_held("a")
        box = boxes.boxes["a"]
        assert held == ("s", b"kept") or list(box) == [("s", b"kept")], "the message was lost"

    asyncio.run(scenario())


def test_a_dead_router_fails_every_waiter() -> None:
    async def broken(_peers: Sequence[str]) -> list[tuple[str, str, bytes]]:
        raise ConnectionError("router gone")

    async def scenario() -> None:
        waiters = Waiters(broken, tick_s=0.01)
        with pytest.raises(ConnectionError):
            await waiters.wait("a", 1.0)

    asyncio.run(scenario())
