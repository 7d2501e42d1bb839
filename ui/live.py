"""The audit trail as the dashboard sees it: fetched incrementally through the SDK.

Why one shared, append-only cache: the message feed, node status (quarantines, late
updates), the isolated-model baselines and the Audit tab's free-text search all read the same
entries. Paging by ``seq`` (keyset) means each refresh asks the oracle only for what is new,
however many browser tabs are open.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from medimesh.client import AuditEntry, Client

__all__ = ["AuditLog", "FeedRow", "feed_rows"]

PAGE = 500


class AuditLog:
    """Every audit entry seen so far (up to ``cap``), refreshed with keyset paging."""

    def __init__(self, cap: int = 200_000, max_pages: int = 20, page: int = PAGE) -> None:
        self.cap = cap
        self.max_pages = max_pages
        self.page = page
        self._entries: list[AuditEntry] = []
        self._after = 0
        self._lock = threading.Lock()
        self.run_id: str | None = None  # the served run (from /ready): current_run's run

    def refresh(self, client: Client) -> int:
        """Fetch entries after the last one seen; returns how many arrived."""
        with self._lock:
            added = 0
            for _ in range(self.max_pages):
                page = client.audit(after_seq=self._after, limit=self.page)
                self._entries.extend(page.entries)
                added += len(page.entries)
                self._after = page.next_after_seq
                if not page.has_more:
                    break
            if len(self._entries) > self.cap:
                del self._entries[: len(self._entries) - self.cap]
            return added

    @property
    def entries(self) -> tuple[AuditEntry, ...]:
        with self._lock:
            return tuple(self._entries)

    @property
    def head_hash(self) -> str:
        with self._lock:
            return self._entries[-1].entry_hash if self._entries else ""

    def current_run(self) -> list[AuditEntry]:
        """The served run's entries (a reused database holds older runs): from the
        ``setup_started`` naming ``run_id`` to the next run's, else since the newest one."""
        entries = self.entries
        starts = [i for i, e in enumerate(entries) if e.event == "setup_started"]
        mine = [i for i in starts if self.run_id and entries[i].body.get("run_id") == self.run_id]
        if mine:
            end = next((i for i in starts if i > mine[-1]), len(entries))
            return list(entries[mine[-1]:end])
        return list(entries[max(starts, default=0):])

    def of(self, *events: str) -> list[AuditEntry]:
        return [e for e in self.current_run() if e.event in events]


@dataclass(frozen=True, slots=True)
class FeedRow:
    """One routed envelope as the feed shows it: metadata only, never the payload."""

    seq: int
    at: float
    sender: str
    recipients: tuple[str, ...]
    type: str
    size: int
    verdict: str


def _verdict(entry: AuditEntry) -> str:
    body = entry.body
    if body.get("accepted"):
        flags = [str(f.get("reason")) for f in body.get("flags") or [] if isinstance(f, dict)]
        return "accepted" + (f" (flagged: {', '.join(flags)})" if flags else "")
    reasons = body.get("reasons") or []
    return "rejected" + (f" ({', '.join(str(r) for r in reasons)})" if reasons else "")


def feed_rows(
    entries: Iterable[AuditEntry], names: Mapping[str, str], limit: int = 40
) -> list[FeedRow]:
    """The newest ``limit`` routed messages, each update joined to its validator verdict.

    The router audits an envelope's digest; the validator names the same digest in its
    verdict, so the join needs no payload. Refused envelopes appear with the router's reason.
    """
    entries = list(entries)
    verdicts = {e.subject: _verdict(e) for e in entries if e.event == "verdict"}
    rows: list[FeedRow] = []
    for e in entries:
        if e.event == "message_routed":
            b = e.body
            kind = str(b.get("type", "?"))
            verdict = verdicts.get(str(b.get("digest", "")), "pending") if kind == "update" else ""
            rows.append(
                FeedRow(
                    e.seq, e.at, _name(str(b.get("from", "")), names),
                    tuple(_name(str(t), names) for t in b.get("to", []) or []),
                    kind, int(b.get("bytes", 0) or 0), verdict,
                )
            )
        elif e.event == "message_refused":
            reason = str(e.body.get("reason", "?"))
            rows.append(FeedRow(e.seq, e.at, "?", ("router",), "?", 0, f"refused ({reason})"))
    return rows[-limit:][::-1]


def _name(peer_id: str, names: Mapping[str, str]) -> str:
    return names.get(peer_id) or (peer_id[:10] + "…" if len(peer_id) > 10 else peer_id or "?")
