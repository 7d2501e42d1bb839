"""The AXL-style routing table: enrolment checks, fault injection and per-peer counters.

Pure bookkeeping for the router actor. It authenticates a sender from the envelope's outer
signature (never decrypting), decides which recipients get a copy under the current faults,
and counts messages and bytes per peer and per edge for ``/network`` and the live feed.
:class:`Mailboxes` are AXL's bounded receive queues (100 messages, the oldest dropped and
counted when full); :class:`DelayLine` delivers each hop at its own due time, so a simulated
WAN delays messages without serializing them.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medimesh.errors import ConfigError, NotEnrolled, PeerUnreachable
from medimesh.identity import Roster
from medimesh.wire import Header, inspect

__all__ = ["MAILBOX_LIMIT", "POLL_DOWN_S", "POLL_LIVE_S", "DelayLine", "Faults", "Mailboxes",
           "PeerCounters", "RoutingTable", "mailbox_status"]

MAILBOX_LIMIT = 100  # AXL's receive queue: it drops the oldest message when full
POLL_LIVE_S = 5.0  # a mailbox peer that polled this recently is "live"
POLL_DOWN_S = 30.0  # ... one silent for longer (or that never polled) is "down"; between: "slow"


def mailbox_status(polled_at: float | None, now: float) -> str:
    """A mailbox (AXL) peer's state, from when it last polled ``/recv``: the router cannot see
    a remote process, only whether something keeps draining its mailbox."""
    if polled_at is None:
        return "down"
    waited = now - polled_at
    return "live" if waited <= POLL_LIVE_S else "slow" if waited <= POLL_DOWN_S else "down"


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected faults: drop probability, per-hop delay (mean ± uniform jitter, seconds), and
    partitions (sets that can't talk)."""

    drop: float = 0.0
    delay_s: float = 0.0
    partitions: tuple[frozenset[str], ...] = ()
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop <= 1.0:
            raise ConfigError("drop must be a probability in [0, 1]")
        if self.delay_s < 0:
            raise ConfigError("delay must be >= 0 seconds")
        if self.jitter_s < 0:
            raise ConfigError("jitter must be >= 0 seconds")

    def hop_delay(self, rng: random.Random) -> float:
        """One hop's delay: ``delay_s`` ± uniform ``jitter_s``, never negative.

        Drawn from the routing table's seeded generator, so a fault seed replays the same
        delays for the same sequence of messages; no draw at all without jitter.
        """
        if self.jitter_s == 0:
            return self.delay_s
        return max(0.0, self.delay_s + rng.uniform(-self.jitter_s, self.jitter_s))

    def separated(self, a: str, b: str) -> bool:
        """Two peers are separated when they sit in different partition groups."""
        group_a = next((i for i, p in enumerate(self.partitions) if a in p), None)
        group_b = next((i for i, p in enumerate(self.partitions) if b in p), None)
        return group_a is not None and group_b is not None and group_a != group_b


@dataclass(slots=True)
class PeerCounters:
    msgs_out: int = 0
    bytes_out: int = 0
    msgs_in: int = 0
    bytes_in: int = 0
    dropped: int = 0
    last_seen: float = 0.0
    mailbox_dropped: int = 0


@dataclass(slots=True)
class RoutingTable:
    """Who is enrolled and reachable, and what has been routed."""

    roster: Roster
    our_peer_id: str
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    reachable: set[str] = field(default_factory=set)
    counters: dict[str, PeerCounters] = field(default_factory=dict)
    edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    bytes_by_type: Counter[str] = field(default_factory=Counter)
    feed: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2000))
    feed_seq: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    last_due: dict[tuple[str, str], float] = field(default_factory=dict)

    def attach(self, peer_id: str) -> None:
        self.roster.get(peer_id)  # raises NotEnrolled
        self.reachable.add(peer_id)
        self.counters.setdefault(peer_id, PeerCounters())

    def detach(self, peer_id: str) -> None:
        self.reachable.discard(peer_id)

    def route(self, envelope: bytes, now: float | None = None) -> tuple[Header, list[str]]:
        """Authenticate and return (header, recipients to deliver to after faults).

        Raises NotEnrolled for an unenrolled sender or recipient, PeerUnreachable when a
        recipient has no live route (AXL's 502), EnvelopeError when the outer signature fails.
        """
        try:
            header = inspect(envelope)
        except Exception as exc:
            self.rejected[type(exc).__name__] += 1
            raise
        if header.sender not in self.roster:
            self.rejected["NotEnrolled"] += 1
            raise NotEnrolled(f"sender {header.sender[:12]}… is not enrolled")
        for r in header.recipients:
            if r not in self.roster:
                self.rejected["NotEnrolled"] += 1
                raise NotEnrolled(f"recipient {r[:12]}… is not enrolled")
            if r not in self.reachable:
                self.rejected["PeerUnreachable"] += 1
                raise PeerUnreachable(f"no route to {self.roster.get(r).name}")
        t = time.time() if now is None else now
        size = len(envelope)
        sender = self.counters.setdefault(header.sender, PeerCounters())
        sender.last_seen = t
        deliver: list[str] = []
        for r in header.recipients:
            dropped = self.faults.separated(header.sender, r) or (
                self.faults.drop > 0 and self.rng.random() < self.faults.drop
            )
            sender.msgs_out += 1
            sender.bytes_out += size
            rc = self.counters.setdefault(r, PeerCounters())
            if dropped:
                rc.dropped += 1
            else:
                rc.msgs_in += 1
                rc.bytes_in += size
                self.edges[(header.sender, r)] += 1
                deliver.append(r)
            self._emit(header, r, size, t, dropped)
        self.by_type[header.type] += 1
        self.bytes_by_type[header.type] += size
        return header, deliver

    def _emit(self, header: Header, to: str, size: int, t: float, dropped: bool) -> None:
        self.feed_seq += 1
        self.feed.append(
            {
                "seq": self.feed_seq,
                "at": t,
                "from": header.sender,
                "to": to,
                "type": header.type,
                "round": header.round,
                "bytes": size,
                "message_id": header.message_id,
                "dropped": dropped,
            }
        )

    def events_since(self, seq: int, limit: int = 500) -> list[dict[str, Any]]:
        return [e for e in self.feed if e["seq"] > seq][:limit]

    def topology(self) -> dict[str, Any]:
        """AXL's /topology shape: our key, peers, and a (star) spanning tree rooted here."""
        peers = sorted(self.reachable)
        return {
            "our_ipv6": "",
            "our_public_key": self.our_peer_id,
            "peers": peers,
            "tree": [
                {"public_key": p, "parent": self.our_peer_id, "sequence": i}
                for i, p in enumerate(peers)
            ],
        }

    def stats(self) -> dict[str, Any]:
        names = {m.peer_id: (m.name, m.role) for m in self.roster}
        return {
            "peers": {
                pid: {
                    "name": names.get(pid, ("?", "?"))[0],
                    "role": names.get(pid, ("?", "?"))[1],
                    "reachable": pid in self.reachable,
                    "msgs_out": c.msgs_out,
                    "bytes_out": c.bytes_out,
                    "msgs_in": c.msgs_in,
                    "bytes_in": c.bytes_in,
                    "dropped": c.dropped,
                    "mailbox_dropped": c.mailbox_dropped,
                    "last_seen": c.last_seen,
                }
                for pid, c in self.counters.items()
            },
            "edges": [{"from": a, "to": b, "messages": n} for (a, b), n in self.edges.items()],
            "messages_by_type": dict(self.by_type),
            "bytes_by_type": dict(self.bytes_by_type),
            "rejected": dict(self.rejected),
            "faults": {"drop": self.faults.drop, "delay_s": self.faults.delay_s,
                       "jitter_s": self.faults.jitter_s},
        }

    def hop_due(self, sender: str, recipient: str, now: float) -> float:
        """When one hop is due: ``now`` plus its delay under the current faults (see
        :meth:`Faults.hop_delay`), but never before the previous hop on the same edge, so
        jitter delays messages without reordering them between one pair (as one TCP stream
        between two AXL nodes would not)."""
        edge = (sender, recipient)
        due = max(now + self.faults.hop_delay(self.rng), self.last_due.get(edge, now))
        self.last_due[edge] = due
        return due

    def overflowed(self, peer: str, n: int = 1) -> None:
        """Count messages a full mailbox dropped (AXL drops its oldest; we count them)."""
        self.counters.setdefault(peer, PeerCounters()).mailbox_dropped += n


class Mailboxes:
    """Bounded per-peer receive queues that drop the OLDEST message when full (as AXL does).

    :meth:`put` returns how many messages it pushed out, so the caller can count and audit
    each drop; nothing is dropped silently. Not thread-safe: the caller holds its lock.
    """

    def __init__(self, limit: int = MAILBOX_LIMIT) -> None:
        if limit < 1:
            raise ConfigError("a mailbox holds at least one message")
        self.limit = limit
        self._boxes: dict[str, deque[tuple[str, bytes]]] = {}
        self.dropped: Counter[str] = Counter()
        self.polled: dict[str, float] = {}  # peer -> when it last asked for its mail (time.time)

    def open(self, peer: str) -> None:
        self._boxes.setdefault(peer, deque())

    def __contains__(self, peer: object) -> bool:
        return peer in self._boxes

    def put(self, peer: str, sender: str, envelope: bytes) -> int:
        box = self._boxes[peer]
        dropped = 0
        while len(box) >= self.limit:
            box.popleft()
            dropped += 1
        box.append((sender, envelope))
        if dropped:
            self.dropped[peer] += dropped
        return dropped

    def pop(self, peer: str, now: float | None = None) -> tuple[str, bytes] | None:
        box = self._boxes.get(peer)
        if box is not None:
            self.polled[peer] = time.time() if now is None else now
        return box.popleft() if box else None

    def size(self, peer: str) -> int:
        return len(self._boxes.get(peer, ()))

    def describe(self, peer: str, now: float) -> dict[str, Any]:
        """What ``/network`` shows of a mailbox peer: queued messages, last poll, status."""
        polled = self.polled.get(peer)
        return {"transport": "axl", "queued": self.size(peer), "last_polled": polled,
                "status": mailbox_status(polled, now)}


class DelayLine:
    """Runs each callback at its own due time (``time.monotonic``) on one daemon thread.

    Scheduling never waits: a hop due in 50 ms does not hold back the next hop, so a
    simulated WAN adds latency to each message without serializing the router. Callbacks run
    in due order (ties in scheduling order); an exception in one is counted, not fatal.
    """

    def __init__(self, name: str = "medimesh-delay-line") -> None:
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._name = name
        self._thread: threading.Thread | None = None
        self._closed = False
        self.errors = 0

    def at(self, due: float, fn: Callable[[], object]) -> None:
        with self._cv:
            if self._closed:
                return
            heapq.heappush(self._heap, (due, next(self._seq), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (
                    not self._heap or self._heap[0][0] > time.monotonic()
                ):
                    self._cv.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                self.errors += 1
