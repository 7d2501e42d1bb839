"""The AXL-style routing table: enrolment checks, fault injection and per-peer counters.

Pure bookkeeping for the router actor. It authenticates a sender from the envelope's outer
signature (never decrypting), decides which recipients get a copy under the current faults,
and counts messages and bytes per peer and per edge for ``/network`` and the live feed.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from medimesh.errors import ConfigError, NotEnrolled, PeerUnreachable
from medimesh.identity import Roster
from medimesh.wire import Header, inspect

__all__ = ["Faults", "PeerCounters", "RoutingTable"]


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected faults: drop probability, fixed delay, and partitions (sets that can't talk)."""

    drop: float = 0.0
    delay_s: float = 0.0
    partitions: tuple[frozenset[str], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop <= 1.0:
            raise ConfigError("drop must be a probability in [0, 1]")
        if self.delay_s < 0:
            raise ConfigError("delay must be >= 0 seconds")

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
                    "last_seen": c.last_seen,
                }
                for pid, c in self.counters.items()
            },
            "edges": [{"from": a, "to": b, "messages": n} for (a, b), n in self.edges.items()],
            "messages_by_type": dict(self.by_type),
            "bytes_by_type": dict(self.bytes_by_type),
            "rejected": dict(self.rejected),
        }
