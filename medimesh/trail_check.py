"""One verdict on an audit trail, from what the verifier holds rather than what the database says.

The trail passes only when all of these hold:

* the chain verifies (every hash and both signatures, ``verify_chain``);
* the signers were checked against a signed roster the verifier holds — a check without one
  ("signers not checked") is never a pass, whatever the chain says;
* no actor's own sequence has a hole (medimesh.actor_seq: an event left out);
* no witnessed chain head contradicts the chain (medimesh.witness: cut or rewritten).

Used by ``medimesh audit verify`` and the oracle's ``/audit/verify``. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medimesh.actor_seq import ActorGap
from medimesh.audit import ChainReport
from medimesh.identity import Roster
from medimesh.witness import WitnessProblem

__all__ = ["NOT_CHECKED", "signer_sets", "trail_verdict"]

NOT_CHECKED = "signers not checked: no signed roster given (--roster)"


def signer_sets(rosters: Iterable[Roster]) -> tuple[set[str], set[str]]:
    """(every member's peer id, the auditors' peer ids) over verified rosters."""
    members: set[str] = set()
    writers: set[str] = set()
    for r in rosters:
        members |= {m.peer_id for m in r}
        writers |= {m.peer_id for m in r.with_role("auditor")}
    return members, writers


def trail_verdict(
    report: ChainReport,
    signers_checked: bool,
    gaps: Sequence[ActorGap] = (),
    witness: Sequence[WitnessProblem] = (),
    names: Mapping[str, str] | None = None,
    heads_checked: int = 0,
) -> dict[str, Any]:
    """The chain report plus the other checks; ``ok`` only when every check ran and passed.

    ``problem`` names the first failure: the chain's broken entry, else a witnessed head
    (entry seq), else an actor gap (actor and missing numbers), else the unchecked signers.
    """
    names = names or {}
    problems: list[str] = []
    broken = report.broken_seq
    if not report.ok:
        problems.append(f"seq {report.broken_seq}: {report.problem}")
    for w in witness:
        problems.append(f"witness {w.witness}: seq {w.length}: {w.problem}")
        broken = w.length if broken is None else broken
    for g in gaps:
        problems.append(g.describe(names.get(g.actor)))
    if not signers_checked:
        problems.append(NOT_CHECKED)
    return {
        **report.to_dict(),
        "ok": not problems,
        "chain_ok": report.ok,
        "broken_seq": broken,
        "problem": problems[0] if problems else "",
        "problems": problems,
        "signers_checked": signers_checked,
        "actor_gaps": [{**g.to_dict(), "name": names.get(g.actor, "")} for g in gaps],
        "witness_problems": [w.to_dict() for w in witness],
        "heads_checked": heads_checked,
    }
