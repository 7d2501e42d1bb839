"""The audit writer actor: sequences signed events into the hash chain and persists them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medimesh.audit import (
    AuditChain,
    AuditEntry,
    AuditEvent,
    AuditSink,
    JsonlSink,
    MemorySink,
    verify_chain,
)
from medimesh.identity import Identity, Roster

__all__ = ["Auditor"]


class Auditor:
    """Single writer of the trail, so the chain has one total order."""

    def __init__(self, seed: bytes, roster_json: str, path: str | None = None) -> None:
        self._identity = Identity.from_seed(seed)
        self._roster = Roster.from_json(roster_json)
        self._sink: AuditSink = JsonlSink(Path(path)) if path else MemorySink()
        last = list(self._sink.entries())
        head = (last[-1].seq, last[-1].entry_hash) if last else (0, "0" * 64)
        self._chain = AuditChain(self._identity, *head)

    def append(self, events: Sequence[AuditEvent]) -> int:
        entries = self._chain.extend(events)
        self._sink.write(entries)
        return self._chain.head[0]

    def head(self) -> tuple[int, str]:
        return self._chain.head

    def entries(
        self, event: str | None = None, round_: int | None = None, limit: int = 0
    ) -> list[AuditEntry]:
        rows = [
            e
            for e in self._sink.entries()
            if (event is None or e.event == event) and (round_ is None or e.round == round_)
        ]
        return rows[-limit:] if limit else rows

    def verify(self) -> dict[str, Any]:
        known = {m.peer_id for m in self._roster}
        r = verify_chain(self._sink.entries(), known)
        return {
            "ok": r.ok,
            "entries": r.entries,
            "head_hash": r.head_hash,
            "broken_seq": r.broken_seq,
            "problem": r.problem,
        }
