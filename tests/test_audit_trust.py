"""Signed rosters, per-actor sequence numbers, witnessed chain heads: the pure parts (issue 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medimesh.actor_seq import actor_gaps
from medimesh.audit import AuditChain, AuditEntry, AuditRecorder, ChainReport, verify_chain
from medimesh.identity import Identity, Member, Roster
from medimesh.signed_roster import (
    UnverifiedRoster,
    add_signature,
    sign_all,
    verify_signed_roster,
)
from medimesh.trail_check import trail_verdict
from medimesh.witness import (
    SignedHead,
    check_heads,
    head_line,
    parse_heads,
    sign_head,
    successor_problem,
)


def _consortium() -> tuple[Roster, dict[str, Identity]]:
    ids = {n: Identity.generate() for n in ("auditor", "coordinator", "st-marys")}
    roles = {"auditor": "auditor", "coordinator": "coordinator", "st-marys": "hospital"}
    return Roster(Member(n, roles[n], i.peer_id) for n, i in ids.items()), ids  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ signed roster


def test_roster_valid_only_with_every_signature() -> None:
    """All members signed: valid. One missing, an added member or a stranger: refused."""
    roster, ids = _consortium()
    text = sign_all(roster, ids.values())
    assert {m.peer_id for m in verify_signed_roster(text)} == {i.peer_id for i in ids.values()}

    doc = json.loads(text)
    del doc["signatures"][ids["st-marys"].peer_id]
    with pytest.raises(UnverifiedRoster, match=r"st-marys \(hospital\) has not signed"):
        verify_signed_roster(json.dumps(doc))

    mallory = Identity.generate()
    doc = json.loads(text)
    doc["members"].append({"name": "mallory", "role": "hospital", "peer_id": mallory.peer_id})
    doc["signatures"][mallory.peer_id] = "00" * 64
    with pytest.raises(UnverifiedRoster, match="does not match this roster"):
        verify_signed_roster(json.dumps(doc))

    with pytest.raises(UnverifiedRoster, match="not signed"):
        verify_signed_roster(roster.to_json())


def test_members_sign_one_by_one() -> None:
    """add_signature accumulates; the file is valid once the last member signed."""
    roster, ids = _consortium()
    text = roster.to_json()
    for name in ("auditor", "coordinator"):
        text = add_signature(text, ids[name])
        with pytest.raises(UnverifiedRoster):
            verify_signed_roster(text)
    text = add_signature(text, ids["st-marys"])
    assert len(verify_signed_roster(text)) == 3


def test_roster_sign_and_verify_commands(tmp_path: Path) -> None:
    """``medimesh roster sign`` per member, then ``roster verify`` exits 0 (2 before)."""
    roster, ids = _consortium()
    path = tmp_path / "roster.json"
    path.write_text(roster.to_json())

    def medimesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from medimesh.cli import main; raise SystemExit(main())",
             *args], capture_output=True, text=True, timeout=60, check=False)

    assert medimesh("roster", "verify", "--roster", str(path)).returncode == 2
    for name, ident in ids.items():
        key = tmp_path / f"{name}.key"
        key.write_text(ident.seed.hex() + "\n")
        key.chmod(0o600)
        done = medimesh("roster", "sign", "--key", str(key), "--roster", str(path))
        assert done.returncode == 0, done.stderr
    done = medimesh("roster", "verify", "--roster", str(path), "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {"ok": True, "members": 3}


# ------------------------------------------------------------------------- actor sequences


def _chain(writer: Identity, rec: AuditRecorder, n: int) -> list[AuditEntry]:
    for i in range(n):
        rec.record("tick", 0, "", {"i": i})
    return AuditChain(writer).extend(rec.drain())


def test_recorder_numbers_its_events_and_gaps_are_named() -> None:
    """actor_seq 1..n under the actor's signature; dropping one is a gap naming it."""
    writer, actor = Identity.generate(), Identity.generate()
    entries = _chain(writer, AuditRecorder(actor), 6)
    assert [e.body["actor_seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert verify_chain(entries).ok and actor_gaps(entries) == []
    events = [e.as_event() for e in entries if e.body["actor_seq"] not in (2, 3)]
    rechained = AuditChain(writer).extend(events)  # the writer re-hashes: the chain is fine
    assert verify_chain(rechained).ok
    (gap,) = actor_gaps(rechained)
    assert gap.actor == actor.peer_id and gap.missing == (2, 3)
    assert "missing actor_seq 2-3" in gap.describe("st-marys")


def test_reordered_or_restarted_actors_are_not_gaps() -> None:
    """A batch retried out of order is no gap; a restarted actor starts a new epoch."""
    writer, actor = Identity.generate(), Identity.generate()
    rec = AuditRecorder(actor)
    for i in range(4):
        rec.record("tick", 0, "", {"i": i})
    a = rec.drain()
    again = AuditRecorder(actor)  # the actor restarted
    again.record("tick", 0)
    entries = AuditChain(writer).extend([a[2], a[3], a[0], a[1], *again.drain()])
    assert actor_gaps(entries) == []


# --------------------------------------------------------------------------- witnessed heads


def test_heads_catch_truncation_rewrite_and_forgery() -> None:
    writer, actor = Identity.generate(), Identity.generate()
    entries = _chain(writer, AuditRecorder(actor), 8)
    heads = [("a", sign_head(writer, 5, entries[4].entry_hash, 1.0)),
             ("b", sign_head(writer, 8, entries[7].entry_hash, 2.0))]
    assert parse_heads("".join(head_line(h) for _, h in heads)) == [h for _, h in heads]
    assert check_heads(entries, heads, {writer.peer_id}) == []
    (cut,) = check_heads(entries[:6], heads, {writer.peer_id})
    assert cut.length == 8 and cut.witness == "b" and "truncation" in cut.problem
    events = [e.as_event() for e in entries]
    rewritten = AuditChain(writer).extend(events[:2] + events[3:])  # one left out, re-hashed
    problems = check_heads(rewritten, heads, {writer.peer_id})
    assert [p.length for p in problems] == [5, 8]
    forged = SignedHead(3, "0" * 64, writer.peer_id, 1.0, "00" * 64)
    (bad,) = check_heads(entries, [("c", forged)], {writer.peer_id})
    assert "forged head" in bad.problem
    stranger = sign_head(Identity.generate(), 3, entries[2].entry_hash, 1.0)
    assert "not an enrolled writer" in check_heads(entries, [("d", stranger)],
                                                   {writer.peer_id})[0].problem


def test_a_witness_sees_a_head_go_back() -> None:
    writer = Identity.generate()
    last = sign_head(writer, 10, "a" * 64, 1.0)
    assert successor_problem(last, sign_head(writer, 12, "b" * 64, 2.0)) == ""
    assert "truncation" in successor_problem(last, sign_head(writer, 9, "b" * 64, 2.0))
    assert "rewritten" in successor_problem(last, sign_head(writer, 10, "c" * 64, 2.0))


def test_unchecked_signers_never_pass() -> None:
    report = ChainReport(True, 4, "a" * 64)
    assert not trail_verdict(report, signers_checked=False)["ok"]
    assert trail_verdict(report, signers_checked=True)["ok"]
