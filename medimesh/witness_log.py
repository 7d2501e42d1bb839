"""A hospital's witness log: the audit writer's signed chain heads, kept in the site's own
state directory (``<witness_dir>/heads.jsonl``), out of the database operator's reach.

The file shell around medimesh.witness (no Ray): it checks each head (signed by the roster's
auditor, not going back) and appends it as one line, flushed and fsynced. Used by the hospital
role's shells (the Ray actor and the standalone node).
"""

from __future__ import annotations

import os
from pathlib import Path

from medimesh.errors import MediMeshError
from medimesh.identity import Roster
from medimesh.protocol import ChainHead
from medimesh.witness import (
    HEADS_FILE,
    SignedHead,
    head_line,
    parse_heads,
    successor_problem,
    verify_head,
)

__all__ = ["WitnessLog"]


class WitnessLog:
    """Checks and keeps the chain heads one site receives."""

    def __init__(self, directory: str, roster: Roster) -> None:
        self.path = Path(directory) / HEADS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writers = {m.peer_id for m in roster.with_role("auditor")}
        heads = parse_heads(self.path.read_text()) if self.path.exists() else []
        self.last: SignedHead | None = heads[-1] if heads else None

    def receive(self, sender: str, payload: bytes) -> str:
        """Keep one head; returns why it was refused ("" when kept)."""
        try:
            msg = ChainHead.from_payload(payload)
            head = SignedHead(msg.length, msg.head_hash, sender, msg.at, msg.signature)
            verify_head(head, self._writers)
        except MediMeshError as exc:
            return str(exc)
        problem = successor_problem(self.last, head)
        with self.path.open("a", encoding="utf-8") as fh:  # kept even when it conflicts
            fh.write(head_line(head))
            fh.flush()
            os.fsync(fh.fileno())
        if not problem:
            self.last = head
        return problem
