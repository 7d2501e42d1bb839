"""A roster copy every member can verify: each member signs the canonical roster.

Rule: a signed roster is valid only when *every* enrolled member's Ed25519 signature over the
canonical roster bytes is present and verifies. The canonical bytes are a domain prefix and the
members sorted by peer id (name, role, peer id) as canonical JSON, so the order of the file does
not matter and no field can change without every signature breaking. A hostile operator can
therefore neither add a signer (the new member's signature is not enough: the old members did
not sign that roster) nor drop one (the remaining signatures cover the old member list).

It does not stop an operator who writes a *whole new* consortium of fresh keys: the defence is
that each party verifies with its *own* copy (the file it signed), never one handed to it.

The file is :meth:`Roster.to_json` plus a ``"signatures"`` object (peer id -> 128 hex), so
every reader of a plain roster (``load_roster``) reads a signed one too. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from nacl.exceptions import BadSignatureError

from medimesh.audit import canonical
from medimesh.errors import ConfigError
from medimesh.identity import Identity, Roster, verify_key

__all__ = [
    "DOMAIN_ROSTER",
    "UnverifiedRoster",
    "add_signature",
    "roster_bytes",
    "sign_all",
    "sign_roster",
    "signed_roster_json",
    "verify_signed_roster",
]

DOMAIN_ROSTER = b"medimesh/roster/v1\0"


class UnverifiedRoster(ConfigError):
    """A roster copy whose signatures are missing, extra or do not verify."""


def roster_bytes(roster: Roster) -> bytes:
    """What every member signs: the domain prefix and the members sorted by peer id."""
    rows = sorted(
        ({"name": m.name, "role": m.role, "peer_id": m.peer_id} for m in roster),
        key=lambda r: r["peer_id"],
    )
    return DOMAIN_ROSTER + canonical({"version": 1, "members": rows})


def sign_roster(identity: Identity, roster: Roster) -> str:
    """One member's signature (128 hex) over the canonical roster; it must be enrolled."""
    if identity.peer_id not in roster:
        raise ConfigError(f"{identity.peer_id[:12]}… is not on the roster it is asked to sign")
    return identity.sign(roster_bytes(roster)).hex()


def signed_roster_json(roster: Roster, signatures: Mapping[str, str]) -> str:
    """The roster file with its signatures (as :meth:`Roster.to_json`, plus ``signatures``)."""
    doc = json.loads(roster.to_json())
    doc["signatures"] = {k: signatures[k] for k in sorted(signatures)}
    return json.dumps(doc, indent=2)


def sign_all(roster: Roster, identities: Iterable[Identity]) -> str:
    """The signed roster file when one party holds every member's key (the demo, a drill)."""
    return signed_roster_json(roster, {i.peer_id: sign_roster(i, roster) for i in identities})


def add_signature(text: str, identity: Identity) -> str:
    """The roster file ``text`` with ``identity``'s signature added; signatures that no longer
    match the member list (it changed since they were made) are dropped."""
    roster = Roster.from_json(text)
    try:
        old = json.loads(text).get("signatures") or {}
    except (AttributeError, json.JSONDecodeError):
        old = {}
    message = roster_bytes(roster)
    kept: dict[str, str] = {}
    for m in roster:
        sig = old.get(m.peer_id) if isinstance(old, dict) else None
        if isinstance(sig, str):
            try:
                verify_key(m.peer_id).verify(message, bytes.fromhex(sig))
            except (BadSignatureError, ValueError):
                continue
            kept[m.peer_id] = sig
    kept[identity.peer_id] = sign_roster(identity, roster)
    return signed_roster_json(roster, kept)


def verify_signed_roster(text: str) -> Roster:
    """Parse a signed roster file and return its roster, or raise :class:`UnverifiedRoster`.

    Every member must have signed exactly these members; a signature from a non-member is an
    error too (someone edited the member list after signing).
    """
    roster = Roster.from_json(text)
    try:
        sigs = json.loads(text).get("signatures")
    except (AttributeError, json.JSONDecodeError) as exc:
        raise UnverifiedRoster(f"roster is not valid: {exc}") from None
    if not isinstance(sigs, dict) or not sigs:
        raise UnverifiedRoster("the roster is not signed (no \"signatures\"): run `medimesh "
                               "roster sign` for every member")
    if not len(roster):
        raise UnverifiedRoster("the roster has no members")
    message = roster_bytes(roster)
    strangers = sorted(set(sigs) - {m.peer_id for m in roster})
    if strangers:
        raise UnverifiedRoster(f"signature by {strangers[0][:12]}…, who is not a member")
    unsigned = [m for m in roster if not isinstance(sigs.get(m.peer_id), str)]
    if unsigned:
        m = unsigned[0]
        raise UnverifiedRoster(f"member {m.name} ({m.role}) has not signed this roster")
    for m in roster:
        sig = sigs[m.peer_id]
        try:
            verify_key(m.peer_id).verify(message, bytes.fromhex(sig))
        except (BadSignatureError, ValueError):
            raise UnverifiedRoster(
                f"member {m.name}'s signature does not match this roster (edited after signing?)"
            ) from None
    return roster
