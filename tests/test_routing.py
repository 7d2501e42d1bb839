"""The AXL-style routing table: enrolment, reachability, faults, counters, topology."""

from __future__ import annotations

import pytest

from medimesh.errors import BadSignature, ConfigError, NotEnrolled, PeerUnreachable
from medimesh.identity import Identity, Member, Roster
from medimesh.routing import Faults, RoutingTable
from medimesh.wire import seal

R, A, B, C, X = (Identity.generate() for _ in range(5))


def _table() -> RoutingTable:
    roster = Roster(
        [
            Member("router", "router", R.peer_id),
            Member("a", "hospital", A.peer_id),
            Member("b", "validator", B.peer_id),
            Member("c", "coordinator", C.peer_id),
        ]
    )
    t = RoutingTable(roster, R.peer_id)
    for p in (A, B, C):
        t.attach(p.peer_id)
    return t


def test_routes_to_every_recipient_and_counts() -> None:
    """An envelope goes to each recipient; bytes and messages are counted per peer and edge."""
    t = _table()
    env = seal(A, "update", [B.peer_id, C.peer_id], 1, b"x" * 100)
    header, deliver = t.route(env)
    assert deliver == [B.peer_id, C.peer_id] and header.sender == A.peer_id
    stats = t.stats()
    assert stats["peers"][A.peer_id]["msgs_out"] == 2
    assert stats["peers"][B.peer_id]["bytes_in"] == len(env)
    assert stats["messages_by_type"] == {"update": 1}
    assert {e["to"] for e in t.events_since(0)} == {B.peer_id, C.peer_id}


def test_unenrolled_sender_and_recipient_are_refused() -> None:
    """The router forwards only between enrolled peers."""
    t = _table()
    with pytest.raises(NotEnrolled):
        t.route(seal(X, "update", [B.peer_id], 1, b""))
    with pytest.raises(NotEnrolled):
        t.route(seal(A, "update", [X.peer_id], 1, b""))
    with pytest.raises(NotEnrolled):
        t.attach(X.peer_id)
    assert t.stats()["rejected"]["NotEnrolled"] == 2


def test_unreachable_peer_is_an_error_and_forged_sender_is_refused() -> None:
    """A detached recipient is AXL's 502; a bad outer signature never routes."""
    t = _table()
    t.detach(C.peer_id)
    with pytest.raises(PeerUnreachable):
        t.route(seal(A, "update", [C.peer_id], 1, b""))
    env = bytearray(seal(A, "update", [B.peer_id], 1, b""))
    env[-1] ^= 1
    with pytest.raises(BadSignature):
        t.route(bytes(env))


def test_faults_drop_and_partition() -> None:
    """Drop probability 1 drops everything; a partition separates its groups."""
    t = _table()
    t.faults = Faults(drop=1.0)
    _, deliver = t.route(seal(A, "update", [B.peer_id], 1, b""))
    assert deliver == [] and t.stats()["peers"][B.peer_id]["dropped"] == 1
    t.faults = Faults(partitions=(frozenset({A.peer_id}), frozenset({B.peer_id})))
    _, deliver = t.route(seal(A, "update", [B.peer_id, C.peer_id], 1, b""))
    assert deliver == [C.peer_id]
    with pytest.raises(ConfigError):
        Faults(drop=1.5)


def test_topology_has_axl_shape() -> None:
    """/topology-like output: our key, peers and a tree of {public_key, parent, sequence}."""
    topo = _table().topology()
    assert topo["our_public_key"] == R.peer_id
    assert set(topo["peers"]) == {A.peer_id, B.peer_id, C.peer_id}
    assert all(set(n) == {"public_key", "parent", "sequence"} for n in topo["tree"])


def test_feed_never_carries_payload_bytes() -> None:
    """Live-feed events are metadata only."""
    t = _table()
    env = seal(A, "update", [B.peer_id], 1, b"SECRET-PAYLOAD")
    t.route(env)
    (event,) = t.events_since(0)
    assert set(event) == {"seq", "at", "from", "to", "type", "round", "bytes", "message_id",
                          "dropped"}
