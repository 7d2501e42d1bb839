"""Per-actor sequence numbers: every event an actor signs carries its own counter.

The counter lives in the event body (``actor_seq``, from 1), beside an ``actor_epoch`` (random
per recorder, so a restarted actor starts a new count instead of repeating one), and is covered
by the actor's signature like the rest of the body. The writer orders events but cannot number
them, so an event it leaves out shows up as a gap: ``actor_seq`` values missing below the
highest one seen for that (actor, epoch). Events may reach the chain out of order (a batch
retried after backpressure), so gaps are computed on the set of numbers, not their order.

What this cannot see: events after the actor's last chained one (the tail); the witnessed
chain heads (medimesh.witness) cover that. Pure: no I/O.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # medimesh.audit stamps with this module: no import cycle at runtime
    from medimesh.audit import AuditEntry

__all__ = ["EPOCH_KEY", "SEQ_KEY", "ActorCounter", "ActorGap", "actor_gaps"]

SEQ_KEY = "actor_seq"
EPOCH_KEY = "actor_epoch"


@dataclass(slots=True)
class ActorCounter:
    """One recorder's counter: stamps a body with the next number of this epoch."""

    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    last: int = 0

    def stamp(self, body: dict[str, Any] | None) -> dict[str, Any]:
        self.last += 1
        return {**(body or {}), SEQ_KEY: self.last, EPOCH_KEY: self.epoch}


@dataclass(frozen=True, slots=True)
class ActorGap:
    """Numbers missing (or repeated) in one actor's sequence."""

    actor: str
    epoch: str
    missing: tuple[int, ...]
    duplicated: tuple[int, ...]
    highest: int

    def describe(self, name: str | None = None) -> str:
        who = name or f"{self.actor[:12]}…"
        parts = []
        if self.missing:
            parts.append(f"missing actor_seq {_ranges(self.missing)}")
        if self.duplicated:
            parts.append(f"repeated actor_seq {_ranges(self.duplicated)}")
        return f"actor {who} (epoch {self.epoch}, up to {self.highest}): " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "missing": list(self.missing),
                "duplicated": list(self.duplicated)}


def _ranges(nums: tuple[int, ...]) -> str:
    out: list[str] = []
    start = prev = nums[0]
    for n in (*nums[1:], None):
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def actor_gaps(entries: Iterable[AuditEntry]) -> list[ActorGap]:
    """Every (actor, epoch) whose numbered events have holes or repeats, oldest actor first."""
    seen: dict[tuple[str, str], list[int]] = {}
    for e in entries:
        n, epoch = e.body.get(SEQ_KEY), e.body.get(EPOCH_KEY)
        if isinstance(n, int) and not isinstance(n, bool) and isinstance(epoch, str):
            seen.setdefault((e.actor, epoch), []).append(n)
    gaps = []
    for (actor, epoch), nums in seen.items():
        counts = Counter(nums)
        top = max(counts)
        missing = tuple(n for n in range(1, top + 1) if n not in counts)
        dup = tuple(sorted(n for n, c in counts.items() if c > 1))
        if missing or dup:
            gaps.append(ActorGap(actor, epoch, missing, dup, top))
    return gaps
