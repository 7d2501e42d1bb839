"""Witnessed chain heads: the writer signs (length, head hash) each round; hospitals keep them.

A head is the audit writer's signed statement "the chain has ``length`` entries and entry
``length`` hashes to ``head_hash``". Every hospital stores each head it receives in its own
state directory (one JSON line per head), out of the database operator's reach. Later,
``medimesh audit verify --witness DIR`` compares the database's chain with every head:

* fewer entries than a witnessed length: the newest entries were cut (truncation);
* a different hash at a witnessed length: the chain was rewritten or an event left out
  and the chain re-hashed, even with the writer's own key;
* a witnessed head not signed by an enrolled writer: a forged head.

Pure: heads are built, signed, parsed and checked here; files are read and written by callers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from nacl.exceptions import BadSignatureError

from medimesh.audit import AuditEntry, canonical
from medimesh.errors import ConfigError
from medimesh.identity import Identity, verify_key

__all__ = [
    "DOMAIN_HEAD",
    "HEADS_FILE",
    "SignedHead",
    "WitnessProblem",
    "check_heads",
    "head_line",
    "parse_heads",
    "sign_head",
    "successor_problem",
    "verify_head",
]

DOMAIN_HEAD = b"medimesh/chain-head/v1\0"
HEADS_FILE = "heads.jsonl"


@dataclass(frozen=True, slots=True)
class SignedHead:
    """The writer's signed chain head: ``length`` entries, the last one hashing to ``head_hash``."""

    length: int
    head_hash: str
    writer: str
    at: float
    signature: str

    def signed_bytes(self) -> bytes:
        doc = {"length": self.length, "head_hash": self.head_hash, "writer": self.writer,
               "at": self.at}
        return DOMAIN_HEAD + canonical(doc)


def sign_head(writer: Identity, length: int, head_hash: str, at: float) -> SignedHead:
    unsigned = SignedHead(int(length), head_hash, writer.peer_id, round(float(at), 6), "")
    sig = writer.sign(unsigned.signed_bytes()).hex()
    return SignedHead(unsigned.length, head_hash, writer.peer_id, unsigned.at, sig)


def verify_head(head: SignedHead, writers: set[str] | None = None) -> None:
    """Raise :class:`ConfigError` unless the head is signed by its writer (one of ``writers``)."""
    if writers is not None and head.writer not in writers:
        raise ConfigError(f"chain head signed by {head.writer[:12]}…, not an enrolled writer")
    if head.length < 0:
        raise ConfigError("chain head with a negative length")
    try:
        verify_key(head.writer).verify(head.signed_bytes(), bytes.fromhex(head.signature))
    except (BadSignatureError, ValueError, ConfigError):
        raise ConfigError(f"chain head at length {head.length}: bad writer signature") from None


def successor_problem(last: SignedHead | None, new: SignedHead) -> str:
    """Why ``new`` cannot follow the last head a witness kept ("" when it can): a shorter chain
    (cut) or the same length with another hash (rewritten), seen the moment it arrives."""
    if last is None:
        return ""
    if new.length < last.length:
        return f"chain head went back from {last.length} to {new.length} entries (truncation)"
    if new.length == last.length and new.head_hash != last.head_hash:
        return f"entry {new.length} hash changed since the last head (rewritten chain)"
    return ""


def head_line(head: SignedHead) -> str:
    """One line of a witness file."""
    return json.dumps(asdict(head), sort_keys=True) + "\n"


def parse_heads(text: str) -> list[SignedHead]:
    """The heads of a witness file; a line that does not parse is a :class:`ConfigError`."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(SignedHead(int(d["length"]), str(d["head_hash"]), str(d["writer"]),
                                  float(d["at"]), str(d["signature"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"witness line {n} is not a chain head: {exc}") from None
    return out


@dataclass(frozen=True, slots=True)
class WitnessProblem:
    """One witnessed head the chain does not match, and who witnessed it."""

    witness: str  # the witness file (or site) that held the head
    length: int  # the witnessed length = the entry seq it names
    problem: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def check_heads(
    entries: Iterable[AuditEntry],
    heads: Iterable[tuple[str, SignedHead]],
    writers: set[str] | None = None,
) -> list[WitnessProblem]:
    """Every witnessed head (witness name, head) that ``entries`` (seq order) contradicts.

    Only the hash at each witnessed length is compared: chain verification (``verify_chain``)
    already ties every earlier entry to it.
    """
    wanted: dict[int, list[tuple[str, SignedHead]]] = {}
    problems: list[WitnessProblem] = []
    for who, head in heads:
        try:
            verify_head(head, writers)
        except ConfigError as exc:
            problems.append(WitnessProblem(who, head.length, f"forged head: {exc}"))
            continue
        if head.length > 0:
            wanted.setdefault(head.length, []).append((who, head))
    last = 0
    for e in entries:
        last = e.seq
        for who, head in wanted.pop(e.seq, []):
            if e.entry_hash != head.head_hash:
                problems.append(WitnessProblem(
                    who, head.length,
                    f"entry {e.seq} hashes to {e.entry_hash[:16]}…, witnessed "
                    f"{head.head_hash[:16]}… (chain rewritten or an event left out)",
                ))
    for length in sorted(wanted):
        for who, _ in wanted[length]:
            problems.append(WitnessProblem(
                who, length,
                f"chain has {last} entries, {who} witnessed {length} (entries "
                f"{last + 1}..{length} cut: truncation)",
            ))
    problems.sort(key=lambda p: (p.length, p.witness))
    return problems
