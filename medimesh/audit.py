"""The audit trail: signed events, hash-chained entries, and the sink interface stores implement.

Two signatures protect every entry. The *actor* that caused an event signs its content
(who, what, which round, body), so a forged event is detectable even by someone who trusts no
database. The *writer* that sequences events signs each ``entry_hash``, and each hash covers
the previous one, so removing, reordering or rewriting entries breaks the chain unless the
writer's key is stolen as well. Bodies carry metadata and digests only — never patient rows.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError

from medimesh.errors import ConfigError
from medimesh.identity import Identity, verify_key

__all__ = [
    "GENESIS",
    "AuditChain",
    "AuditEntry",
    "AuditEvent",
    "AuditRecorder",
    "AuditSink",
    "ChainReport",
    "JsonlSink",
    "MemorySink",
    "canonical",
    "sign_event",
    "verify_chain",
]

GENESIS = "0" * 64
DOMAIN_EVENT = b"medimesh/audit-event/v1\0"
DOMAIN_ENTRY = b"medimesh/audit-entry/v1\0"


def canonical(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Something an actor did, signed by that actor."""

    at: float
    actor: str
    event: str
    round: int
    subject: str
    body: dict[str, Any]
    signature: str

    def signed_bytes(self) -> bytes:
        doc = {
            "at": self.at,
            "actor": self.actor,
            "event": self.event,
            "round": self.round,
            "subject": self.subject,
            "body": self.body,
        }
        return DOMAIN_EVENT + canonical(doc)


def sign_event(
    identity: Identity,
    event: str,
    round_: int,
    subject: str = "",
    body: dict[str, Any] | None = None,
    at: float | None = None,
) -> AuditEvent:
    unsigned = AuditEvent(
        at=round(time.time() if at is None else at, 6),
        actor=identity.peer_id,
        event=event,
        round=round_,
        subject=subject,
        body=dict(body or {}),
        signature="",
    )
    sig = identity.sign(unsigned.signed_bytes()).hex()
    return AuditEvent(**{**_fields(unsigned), "signature": sig})


def _fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__slots__}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the trail: an event plus its place in the chain."""

    seq: int
    at: float
    actor: str
    event: str
    round: int
    subject: str
    body: dict[str, Any]
    signature: str
    prev_hash: str
    entry_hash: str
    writer: str
    writer_signature: str

    def as_event(self) -> AuditEvent:
        return AuditEvent(
            self.at, self.actor, self.event, self.round, self.subject, self.body, self.signature
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> AuditEntry:
        return cls(**json.loads(line))


def _entry_hash(seq: int, prev_hash: str, event: AuditEvent, writer: str) -> str:
    doc = {"seq": seq, "writer": writer, **_fields(event)}
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(doc)).hexdigest()


class AuditChain:
    """Sequences signed events into chained entries; the writer signs every entry hash."""

    def __init__(self, writer: Identity, last_seq: int = 0, last_hash: str = GENESIS) -> None:
        self._writer = writer
        self._seq = last_seq
        self._hash = last_hash

    @property
    def head(self) -> tuple[int, str]:
        return self._seq, self._hash

    def extend(self, events: Iterable[AuditEvent]) -> list[AuditEntry]:
        out: list[AuditEntry] = []
        for ev in events:
            seq = self._seq + 1
            h = _entry_hash(seq, self._hash, ev, self._writer.peer_id)
            wsig = self._writer.sign(DOMAIN_ENTRY + bytes.fromhex(h)).hex()
            out.append(
                AuditEntry(
                    seq=seq,
                    prev_hash=self._hash,
                    entry_hash=h,
                    writer=self._writer.peer_id,
                    writer_signature=wsig,
                    **_fields(ev),
                )
            )
            self._seq, self._hash = seq, h
        return out


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Result of verifying a trail: ok, or the first broken entry and what broke."""

    ok: bool
    entries: int
    head_hash: str
    broken_seq: int | None = None
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "head_hash": self.head_hash,
            "broken_seq": self.broken_seq,
            "problem": self.problem,
        }


def verify_chain(
    entries: Iterable[AuditEntry], known_signers: set[str] | None = None
) -> ChainReport:
    """Recompute every hash and signature and check sequence continuity."""
    prev_hash, expected_seq, count = GENESIS, 1, 0
    for e in entries:
        count += 1
        problem = _entry_problem(e, expected_seq, prev_hash, known_signers)
        if problem:
            return ChainReport(False, count, prev_hash, e.seq, problem)
        prev_hash, expected_seq = e.entry_hash, expected_seq + 1
    return ChainReport(True, count, prev_hash)


def _entry_problem(
    e: AuditEntry, expected_seq: int, prev_hash: str, known_signers: set[str] | None
) -> str:
    """What is wrong with one entry given its predecessor, or "" when nothing is."""
    if e.seq != expected_seq:
        kind = "removed row(s)" if e.seq > expected_seq else "reordered or duplicated rows"
        return f"sequence gap: expected {expected_seq}, found {e.seq} ({kind})"
    if e.prev_hash != prev_hash:
        return "prev_hash does not match the previous entry (removed or reordered rows)"
    if known_signers is not None:
        for who, role in ((e.actor, "actor"), (e.writer, "writer")):
            if who not in known_signers:
                return f"unknown signer: {role} {who[:12]}… is not enrolled"
    try:
        verify_key(e.actor).verify(e.as_event().signed_bytes(), bytes.fromhex(e.signature))
    except (BadSignatureError, ValueError, ConfigError):
        return "bad actor signature (changed body or forged event)"
    if _entry_hash(e.seq, e.prev_hash, e.as_event(), e.writer) != e.entry_hash:
        return "entry_hash does not match the entry's content"
    try:
        verify_key(e.writer).verify(
            DOMAIN_ENTRY + bytes.fromhex(e.entry_hash), bytes.fromhex(e.writer_signature)
        )
    except (BadSignatureError, ValueError, ConfigError):
        return "bad writer signature"
    return ""


class AuditSink(Protocol):
    """Where chained entries are persisted. The PostgreSQL store implements this too."""

    def write(self, entries: Sequence[AuditEntry]) -> None: ...

    def entries(self) -> Iterator[AuditEntry]: ...


class MemorySink:
    """Keeps entries in a list: tests and short-lived runs."""

    def __init__(self) -> None:
        self._rows: list[AuditEntry] = []
        self._lock = threading.Lock()

    def write(self, entries: Sequence[AuditEntry]) -> None:
        with self._lock:
            self._rows.extend(entries)

    def entries(self) -> Iterator[AuditEntry]:
        with self._lock:
            return iter(list(self._rows))


class JsonlSink:
    """Appends one JSON line per entry, flushed per batch: the pre-database file sink."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        with self._path.open("a", encoding="utf-8") as fh:
            fh.write("".join(e.to_json() + "\n" for e in entries))
            fh.flush()

    def entries(self) -> Iterator[AuditEntry]:
        if not self._path.exists():
            return iter(())
        with self._path.open(encoding="utf-8") as fh:
            return iter([AuditEntry.from_json(line) for line in fh if line.strip()])


class AuditRecorder:
    """An actor's outbox of signed audit events, drained in batches by its shell.

    Every event carries this recorder's own counter (medimesh.actor_seq) inside its signed
    body, so an event the writer leaves out is a named gap, not a silence.
    """

    def __init__(self, identity: Identity) -> None:
        from medimesh.actor_seq import ActorCounter

        self._identity = identity
        self._buffer: list[AuditEvent] = []
        self._counter = ActorCounter()

    def record(
        self, event: str, round_: int, subject: str = "", body: dict[str, Any] | None = None
    ) -> None:
        stamped = self._counter.stamp(body)
        self._buffer.append(sign_event(self._identity, event, round_, subject, stamped))

    def drain(self) -> list[AuditEvent]:
        out, self._buffer = self._buffer, []
        return out

    def restore(self, events: Sequence[AuditEvent]) -> None:
        """Put events the writer refused back in front of the buffer (kept for a retry)."""
        self._buffer = [*events, *self._buffer]

    def __len__(self) -> int:
        return len(self._buffer)
