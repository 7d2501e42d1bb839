"""Identities, key files and the roster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medimesh.errors import ConfigError, NotEnrolled
from medimesh.identity import Identity, Member, Roster


def test_peer_id_is_the_64_hex_public_key() -> None:
    """A peer id is the Ed25519 public key in hex, as in AXL."""
    ident = Identity.generate()
    assert len(ident.peer_id) == 64
    assert Identity.from_seed(ident.seed).peer_id == ident.peer_id


def test_key_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    """Keys are written owner-only and a second save refuses to clobber the first."""
    path = tmp_path / "keys" / "a.key"
    ident = Identity.generate()
    ident.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Identity.load(path).peer_id == ident.peer_id
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)


def test_loading_a_world_readable_key_is_refused(tmp_path: Path) -> None:
    """A key file readable by others is an error, not a warning."""
    path = tmp_path / "a.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load(path)


def test_repr_never_shows_the_secret() -> None:
    """Printing an identity shows a peer-id prefix, never the seed."""
    ident = Identity.generate()
    assert ident.seed.hex() not in repr(ident)


def test_roster_enforces_roles_and_uniqueness() -> None:
    """The roster refuses duplicates and checks roles."""
    a, b = Identity.generate(), Identity.generate()
    roster = Roster([Member("a", "hospital", a.peer_id)])
    assert roster.require(a.peer_id, "hospital").name == "a"
    with pytest.raises(NotEnrolled):
        roster.require(a.peer_id, "validator")
    with pytest.raises(NotEnrolled):
        roster.get(b.peer_id)
    with pytest.raises(ConfigError):
        roster.add(Member("a", "hospital", b.peer_id))
    with pytest.raises(ConfigError):
        Member("x", "hospital", "not-hex")
    again = Roster.from_json(roster.to_json())
    assert [m.peer_id for m in again] == [a.peer_id]
