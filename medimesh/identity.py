"""Node identities and the consortium roster.

A node is one Ed25519 key pair; its peer id is the 64-hex public key, as in Gensyn AXL. The
X25519 key used for encryption is derived from the same pair, so one secret is all a node keeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from medimesh.errors import ConfigError, NotEnrolled

__all__ = [
    "ROLES",
    "Identity",
    "Member",
    "Role",
    "Roster",
    "curve_public_key",
    "verify_key",
]

Role = Literal["hospital", "router", "validator", "coordinator", "auditor", "oracle"]
ROLES: tuple[Role, ...] = ("hospital", "router", "validator", "coordinator", "auditor", "oracle")


def _check_peer_id(peer_id: str) -> str:
    if len(peer_id) != 64 or any(c not in "0123456789abcdef" for c in peer_id):
        raise ConfigError(f"peer id must be 64 lowercase hex characters, got {peer_id!r}")
    return peer_id


def verify_key(peer_id: str) -> VerifyKey:
    """The Ed25519 verify key a peer id names."""
    return VerifyKey(bytes.fromhex(_check_peer_id(peer_id)))


def curve_public_key(peer_id: str) -> PublicKey:
    """The X25519 public key derived from a peer id (for sealing to that peer)."""
    return verify_key(peer_id).to_curve25519_public_key()


class Identity:
    """A node's secret key pair. Never logged, pickled into logs, or stored in the database."""

    __slots__ = ("_boxes", "_curve", "_peer_id", "_signing")

    def __init__(self, signing_key: SigningKey) -> None:
        self._signing = signing_key
        self._curve: PrivateKey = signing_key.to_curve25519_private_key()
        self._peer_id = signing_key.verify_key.encode().hex()
        self._boxes: dict[str, Box] = {}

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise ConfigError("an identity seed is exactly 32 bytes")
        return cls(SigningKey(seed))

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def seed(self) -> bytes:
        """The 32-byte secret; only for handing a key to the actor that owns it."""
        return bytes(self._signing)

    @property
    def curve_private_key(self) -> PrivateKey:
        return self._curve

    def box(self, peer_id: str) -> Box:
        """The X25519 Box shared with a peer, cached: the key agreement is the costly part."""
        box = self._boxes.get(peer_id)
        if box is None:
            if len(self._boxes) > 4096:
                self._boxes.clear()
            box = self._boxes[peer_id] = Box(self._curve, curve_public_key(peer_id))
        return box

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature."""
        return self._signing.sign(message).signature

    def save(self, path: Path) -> None:
        """Write the seed as hex to a 0600 file (created exclusively, never overwritten)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.seed.hex() + "\n")

    @classmethod
    def load(cls, path: Path) -> Identity:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"key file {path} is readable by others (mode {mode:o}); chmod 600")
        try:
            return cls.from_seed(bytes.fromhex(path.read_text().strip()))
        except ValueError as exc:
            raise ConfigError(f"key file {path} does not hold a 64-hex seed") from exc

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id[:12]}…)"

    def __reduce__(self) -> tuple[object, ...]:
        # Ray pickles actor arguments; keep that explicit rather than via __dict__ guesses.
        return (Identity.from_seed, (self.seed,))


@dataclass(frozen=True, slots=True)
class Member:
    """One enrolled node: its human name, role and peer id."""

    name: str
    role: Role
    peer_id: str

    def __post_init__(self) -> None:
        _check_peer_id(self.peer_id)
        if self.role not in ROLES:
            raise ConfigError(f"unknown role {self.role!r}; expected one of {ROLES}")
        if not self.name:
            raise ConfigError("a member needs a non-empty name")


class Roster:
    """The consortium allow-list: who may send, and in which role."""

    def __init__(self, members: Iterable[Member] = ()) -> None:
        self._by_id: dict[str, Member] = {}
        self._by_name: dict[str, Member] = {}
        for member in members:
            self.add(member)

    def add(self, member: Member) -> None:
        if member.peer_id in self._by_id:
            raise ConfigError(f"peer {member.peer_id[:12]}… is already enrolled")
        if member.name in self._by_name:
            raise ConfigError(f"a member named {member.name!r} is already enrolled")
        self._by_id[member.peer_id] = member
        self._by_name[member.name] = member

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._by_id

    def __iter__(self) -> Iterator[Member]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, peer_id: str) -> Member:
        try:
            return self._by_id[peer_id]
        except KeyError:
            raise NotEnrolled(f"peer {peer_id[:12]}… is not on the roster") from None

    def by_name(self, name: str) -> Member:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotEnrolled(f"no member named {name!r}") from None

    def require(self, peer_id: str, role: Role) -> Member:
        member = self.get(peer_id)
        if member.role != role:
            raise NotEnrolled(f"peer {member.name} is enrolled as {member.role}, not {role}")
        return member

    def with_role(self, role: Role) -> list[Member]:
        return [m for m in self._by_id.values() if m.role == role]

    def to_json(self) -> str:
        rows = [{"name": m.name, "role": m.role, "peer_id": m.peer_id} for m in self]
        return json.dumps({"version": 1, "members": rows}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Roster:
        try:
            doc = json.loads(text)
            return cls(Member(r["name"], r["role"], r["peer_id"]) for r in doc["members"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"roster is not valid: {exc}") from exc
