"""Audit over the wire (issue 16): a remote node's outbox, sealed to the auditor, checked there.

The auditor is the real ``Auditor`` class (called directly: its Ray shell only adds the call),
the envelopes real PyNaCl envelopes, the outbox the one ``medimesh node hospital`` runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medimesh.actors.auditor import Auditor
from medimesh.audit import AuditEvent, AuditRecorder, sign_event
from medimesh.audit_ingest import event_to_json, ingest
from medimesh.errors import ConfigError, PeerUnreachable
from medimesh.identity import Identity, Member, Roster
from medimesh.node.outbox import AuditOutbox
from medimesh.protocol import AuditEvents, SetupRequest
from medimesh.wire import seal

AUD, H1, H2, X = (Identity.generate() for _ in range(4))  # X: never enrolled
ROSTER = Roster([Member("auditor", "auditor", AUD.peer_id), Member("h1", "hospital", H1.peer_id),
                 Member("h2", "hospital", H2.peer_id)])


def _auditor() -> Auditor:
    return Auditor(AUD.seed, ROSTER.to_json())


def _events(who: Identity, n: int) -> list[AuditEvent]:
    rec = AuditRecorder(who)
    for i in range(n):
        rec.record("round_trained", i, "", {"n": i})
    return rec.drain()


def test_outbox_batches_reach_the_chain_in_order_and_verify() -> None:
    auditor = _auditor()
    box = AuditOutbox(H1, AUD.peer_id, batch=4)
    rec = AuditRecorder(H1)
    for i in range(10):
        rec.record("round_trained", i, "", {"n": i})
    box.add(rec.drain())
    sent: list[bytes] = []

    def send(envelope: bytes) -> int:
        sent.append(envelope)
        auditor.deliver(envelope)
        return 1

    assert box.flush(send) == 10 and box.pending() == 0
    assert len(sent) == 3  # 4 + 4 + 2
    entries = auditor.entries()
    assert [e.body["n"] for e in entries] == list(range(10))
    assert {e.actor for e in entries} == {H1.peer_id}
    assert auditor.verify()["ok"]


def test_a_failed_send_keeps_the_sealed_batch_and_resends_the_same_bytes() -> None:
    box = AuditOutbox(H1, AUD.peer_id, batch=8)
    box.add(_events(H1, 3))
    tries: list[bytes] = []

    def down(envelope: bytes) -> int:
        tries.append(envelope)
        raise PeerUnreachable("front is restarting")

    assert box.flush(down) == 0 and box.pending() == 3 and box.failures == 1
    assert "PeerUnreachable" in box.last_error
    box.add(_events(H1, 2))
    def up(envelope: bytes) -> int:
        tries.append(envelope)
        return 1

    assert box.flush(up) == 5
    assert tries[0] == tries[1]  # byte for byte: the AXL front routes a repeat only once
    assert box.pending() == 0


@pytest.mark.parametrize("case", ["other_actor", "bad_signature", "stranger", "wrong_type"])
def test_the_auditor_refuses_a_bad_batch_whole_and_chains_why(case: str) -> None:
    auditor = _auditor()
    good = _events(H1, 2)
    sender = H1
    docs = [event_to_json(e) for e in good]
    type_, payload = AuditEvents.TYPE, b""
    if case == "other_actor":  # h1 passing off h2's (validly signed) event as its own batch
        docs.append(event_to_json(sign_event(H2, "update_sent", 1)))
    elif case == "bad_signature":
        docs[1] = {**docs[1], "body": {**docs[1]["body"], "n": 99}}
    elif case == "stranger":
        sender = X
        docs = [event_to_json(sign_event(X, "hello", 0))]
    if case == "wrong_type":
        type_, payload = SetupRequest.TYPE, SetupRequest("s", 2, 2).to_payload()
    else:
        payload = AuditEvents(docs).to_payload()
    auditor.deliver(seal(sender, type_, [AUD.peer_id], 0, payload))
    entries = auditor.entries()
    assert [e.event for e in entries] == ["audit_events_refused"]
    assert entries[0].actor == AUD.peer_id and entries[0].subject == sender.peer_id
    reason = entries[0].body["reason"]
    expected = {"other_actor": "not the sender", "bad_signature": "does not verify",
                "stranger": "not on the roster", "wrong_type": "unexpected message type"}
    assert expected[case] in reason


def test_an_envelope_not_for_the_auditor_is_refused() -> None:
    events = [event_to_json(e) for e in _events(H1, 1)]
    env = seal(H1, AuditEvents.TYPE, [H2.peer_id], 0, AuditEvents(events).to_payload())
    got = ingest(AUD, {H1.peer_id}, env)
    assert not got.accepted and got.refused.startswith("envelope: ")


def test_an_event_missing_a_field_is_malformed() -> None:
    doc = event_to_json(_events(H1, 1)[0])
    doc.pop("signature")
    env = seal(H1, AuditEvents.TYPE, [AUD.peer_id], 0, AuditEvents([doc]).to_payload())
    got = ingest(AUD, {H1.peer_id}, env)
    assert got.refused.startswith("malformed")
    assert dataclasses.asdict(got)["accepted"] == []


def test_a_node_refuses_an_unsigned_roster_copy(tmp_path: Path) -> None:
    from medimesh.node.hospital import load_verified_roster
    from medimesh.signed_roster import sign_all

    plain = tmp_path / "roster.json"
    plain.write_text(ROSTER.to_json())
    with pytest.raises(ConfigError, match="not signed"):
        load_verified_roster(plain)
    signed = tmp_path / "signed.json"
    signed.write_text(sign_all(ROSTER, [AUD, H1, H2]))
    assert load_verified_roster(signed).get(H1.peer_id).name == "h1"
    edited = tmp_path / "edited.json"
    edited.write_text(signed.read_text().replace('"h2"', '"h3"'))
    with pytest.raises(ConfigError, match="edited after signing"):
        load_verified_roster(edited)


def test_a_drained_mailbox_keeps_only_the_newest_round_start() -> None:
    """After a restart the node skips RoundStarts a newer queued one supersedes."""
    from medimesh.node.hospital import superseded
    from medimesh.wire import Header, inspect

    def header(type_: str, round_: int) -> Header:
        return inspect(seal(AUD, type_, [H1.peer_id], round_, b"x"))

    drained: list[Header | None] = [
        header("round_start", 3), header("setup_result", 4), header("round_start", 4),
        None, header("model_published", 4), header("round_start", 5),
    ]
    assert superseded(drained) == {0: 5, 2: 5}
    assert superseded([header("round_start", 2), header("round_start", 2)]) == {}
    assert superseded([]) == {}
