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


def test_mailbox_drops_its_oldest_and_counts_it() -> None:
    """AXL's bounded queue: at the limit, a new message pushes out the oldest; put says how
    many went, and the per-peer count keeps them."""
    from medimesh.routing import MAILBOX_LIMIT, Mailboxes

    boxes = Mailboxes(3)
    boxes.open("p")
    assert [boxes.put("p", "s", bytes([i])) for i in range(5)] == [0, 0, 0, 1, 1]
    assert boxes.dropped["p"] == 2 and boxes.size("p") == 3
    assert [boxes.pop("p") for _ in range(4)] == [("s", b"\x02"), ("s", b"\x03"),
                                                  ("s", b"\x04"), None]
    assert Mailboxes().limit == MAILBOX_LIMIT == 100
    with pytest.raises(ConfigError):
        Mailboxes(0)
    t = _table()
    t.overflowed(B.peer_id, 2)
    assert t.stats()["peers"][B.peer_id]["mailbox_dropped"] == 2


def test_jitter_is_bounded_and_replayed_by_the_fault_seed() -> None:
    """delay ± jitter per hop, never negative, the same sequence for the same seed; without
    jitter the delay is fixed and the generator untouched (drop draws do not shift)."""
    import random

    faults = Faults(delay_s=0.05, jitter_s=0.02)
    a = [faults.hop_delay(random.Random(7)) for _ in range(1)]
    rng1, rng2 = random.Random(7), random.Random(7)
    seq1 = [faults.hop_delay(rng1) for _ in range(200)]
    seq2 = [faults.hop_delay(rng2) for _ in range(200)]
    assert seq1 == seq2 and seq1[0] == a[0]
    assert all(0.03 <= d <= 0.07 for d in seq1) and len(set(seq1)) > 100
    assert Faults(delay_s=0.01, jitter_s=0.05).hop_delay(random.Random(1)) >= 0.0
    rng = random.Random(3)
    state = rng.getstate()
    assert Faults(delay_s=0.2).hop_delay(rng) == 0.2 and rng.getstate() == state
    with pytest.raises(ConfigError, match="jitter"):
        Faults(jitter_s=-0.1)


def test_delay_line_runs_callbacks_at_their_due_time_in_order() -> None:
    """Scheduling returns at once; callbacks run in due order (not in scheduling order), and
    one that raises is counted without stopping the line."""
    import threading
    import time

    from medimesh.routing import DelayLine

    line = DelayLine()
    ran: list[tuple[str, float]] = []
    done = threading.Event()
    t0 = time.monotonic()

    def boom() -> None:
        raise RuntimeError("x")

    def late() -> None:
        ran.append(("late", time.monotonic()))
        done.set()

    line.at(t0 + 0.15, late)
    line.at(t0 + 0.05, lambda: ran.append(("early", time.monotonic())))
    line.at(t0 + 0.06, boom)
    assert line.pending() == 3
    assert done.wait(10)
    assert [n for n, _ in ran] == ["early", "late"]
    assert ran[0][1] >= t0 + 0.05 and ran[1][1] >= t0 + 0.15  # never early
    assert line.errors == 1 and line.pending() == 0
    line.close()
    line.at(t0, lambda: ran.append(("closed", 0.0)))
    assert line.pending() == 0


def test_hops_on_one_edge_keep_their_order_under_jitter() -> None:
    """Jitter varies each hop's delay, but a later message on the same edge is never due
    before an earlier one; other edges are independent; no faults: due now."""
    t = _table()
    assert t.hop_due(A.peer_id, B.peer_id, 10.0) == 10.0
    t.faults = Faults(delay_s=0.05, jitter_s=0.04)
    dues = [t.hop_due(A.peer_id, B.peer_id, 10.0 + i * 0.001) for i in range(200)]
    assert dues == sorted(dues) and all(d >= 10.0 + 0.01 for d in dues)
    raw = [t.hop_due(A.peer_id, C.peer_id, 20.0) - 20.0 for _ in range(1)]
    assert 0.01 <= raw[0] <= 0.09
    t.faults = Faults()  # faults cleared: a hop still waits for the edge's last delayed one
    assert t.hop_due(A.peer_id, B.peer_id, 10.0) == dues[-1]
    assert t.hop_due(A.peer_id, B.peer_id, 99.0) == 99.0
