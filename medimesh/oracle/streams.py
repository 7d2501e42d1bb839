"""``/events``: the audit feed as Server-Sent Events, resumable with ``Last-Event-ID``.

:func:`audit_stream` is the stream's bookkeeping (where to resume, how many were sent, when to
send a keepalive, when to stop) over three callables the HTTP shell passes in: a page of
entries after a sequence number, the event the next store NOTIFY sets, and whether the
client has gone. Each entry's SSE ``id`` is its sequence number, so a client that reconnects
with ``Last-Event-ID`` misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from medimesh.audit import AuditEntry
from medimesh.oracle.responses import entry_dict

__all__ = ["BATCH", "KEEPALIVE_S", "audit_stream", "resume_after", "sse"]

KEEPALIVE_S = 15.0
BATCH = 500

Fetch = Callable[[int, int], Awaitable[Sequence[AuditEntry]]]


def sse(entry: AuditEntry) -> bytes:
    """One audit entry as an SSE frame (``id`` = its sequence number)."""
    data = json.dumps(entry_dict(entry), separators=(",", ":"), ensure_ascii=False)
    return f"id: {entry.seq}\nevent: audit\ndata: {data}\n\n".encode()


def resume_after(last_event_id: str | None, after_seq: int | None) -> int | None:
    """The sequence number to stream after: ``Last-Event-ID`` wins over ``after_seq``; None
    when the header is not a sequence number (a 422)."""
    if last_event_id is None:
        return after_seq or 0
    if not last_event_id.strip().isdigit():
        return None
    return int(last_event_id)


async def audit_stream(
    fetch: Fetch,
    changed: Callable[[], asyncio.Event],
    disconnected: Callable[[], Awaitable[bool]],
    start: int,
    max_events: int | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """Entries after ``start`` as SSE frames, then new ones as they are announced; a comment
    every ``keepalive_s`` while idle; ends after ``max_events`` or when the client is gone.

    ``changed()`` is read before each fetch, so an announcement between the fetch and the
    wait is never lost.
    """
    last, sent = start, 0
    yield b"retry: 2000\n\n"
    while max_events is None or sent < max_events:
        ev = changed()
        want = BATCH if max_events is None else min(BATCH, max_events - sent)
        batch = await fetch(last, want)
        for e in batch:
            yield sse(e)
            last, sent = e.seq, sent + 1
        if batch:
            continue
        if await disconnected():
            return
        try:
            await asyncio.wait_for(ev.wait(), keepalive_s)
        except TimeoutError:
            yield b": keepalive\n\n"
