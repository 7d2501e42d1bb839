"""The audit chain: verification and detection of every kind of edit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medimesh.audit import (
    AuditChain,
    AuditEntry,
    JsonlSink,
    MemorySink,
    sign_event,
    verify_chain,
)
from medimesh.identity import Identity

WRITER, ACTOR, STRANGER = (Identity.generate() for _ in range(3))
KNOWN = {WRITER.peer_id, ACTOR.peer_id}


def _entries(n: int = 6) -> list[AuditEntry]:
    chain = AuditChain(WRITER)
    events = [sign_event(ACTOR, "verdict", i, f"s{i}", {"accepted": i % 2 == 0}) for i in range(n)]
    return chain.extend(events)


def test_an_untouched_chain_verifies() -> None:
    """Fresh entries verify and the report names the head hash."""
    rows = _entries()
    report = verify_chain(rows, KNOWN)
    assert report.ok and report.entries == 6 and report.head_hash == rows[-1].entry_hash


def test_changed_body_is_detected() -> None:
    """Editing a body breaks the actor signature at that entry."""
    rows = _entries()
    rows[2] = dataclasses.replace(rows[2], body={"accepted": False, "edited": True})
    report = verify_chain(rows, KNOWN)
    assert not report.ok and report.broken_seq == 3 and "signature" in report.problem


def test_removed_row_is_detected() -> None:
    """Deleting an entry leaves a sequence gap named at the next entry."""
    rows = _entries()
    del rows[3]
    report = verify_chain(rows, KNOWN)
    assert not report.ok and report.broken_seq == 5 and "removed" in report.problem


def test_reordered_rows_are_detected() -> None:
    """Swapping two entries breaks sequence continuity."""
    rows = _entries()
    rows[1], rows[2] = rows[2], rows[1]
    report = verify_chain(rows, KNOWN)
    assert not report.ok and report.broken_seq == 3


def test_renumbered_rewrite_needs_the_writer_key() -> None:
    """Rechaining after a deletion without the writer's key fails on the writer signature."""
    rows = _entries()
    forger = AuditChain(STRANGER)
    forged = forger.extend(r.as_event() for r in rows[:2] + rows[3:])
    report = verify_chain(forged, KNOWN)
    assert not report.ok and "unknown signer" in report.problem
    relabelled = [dataclasses.replace(f, writer=WRITER.peer_id) for f in forged]
    report = verify_chain(relabelled, KNOWN)
    assert not report.ok and report.broken_seq == 1 and "entry_hash" in report.problem


def test_unknown_signer_is_detected() -> None:
    """An event signed by a key that is not enrolled is named as an unknown signer."""
    chain = AuditChain(WRITER)
    rows = chain.extend([sign_event(STRANGER, "x", 0)])
    report = verify_chain(rows, KNOWN)
    assert not report.ok and "unknown signer" in report.problem


def test_sinks_round_trip(tmp_path: Path) -> None:
    """Memory and JSONL sinks return exactly what was written, in order."""
    rows = _entries()
    for sink in (MemorySink(), JsonlSink(tmp_path / "audit.jsonl")):
        sink.write(rows[:3])
        sink.write(rows[3:])
        assert list(sink.entries()) == rows
    assert verify_chain(JsonlSink(tmp_path / "audit.jsonl").entries(), KNOWN).ok


def test_chain_resumes_from_its_head() -> None:
    """A new writer process continues the chain from the stored head."""
    rows = _entries(3)
    more = AuditChain(WRITER, rows[-1].seq, rows[-1].entry_hash).extend(
        [sign_event(ACTOR, "round_closed", 4)]
    )
    assert verify_chain(rows + more, KNOWN).ok
