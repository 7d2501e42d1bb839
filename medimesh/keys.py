"""Key files and the roster file: what an operator creates before a consortium starts.

A node's secret is one 32-byte Ed25519 seed in a 0600 file (``NAME.key``); its public half,
the peer id, goes in ``NAME.pub`` so it can be mailed to whoever keeps the roster. The roster
file is exactly :meth:`Roster.to_json`, the document the runtime hands to every actor, so what
``medimesh roster show`` prints is what the router and validator enforce.

Every failure an operator can cause (missing or unreadable file, a key others can read, a bad
peer id, a duplicate name or key) raises :class:`ConfigError` with the path in the message.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medimesh.errors import ConfigError, NotEnrolled
from medimesh.identity import ROLES, Identity, Member, Role, Roster, curve_public_key

__all__ = [
    "KEY_SUFFIX",
    "PUB_SUFFIX",
    "ROSTER_FILE",
    "SINGLETON_ROLES",
    "NewKey",
    "add_member",
    "axl_pem",
    "check_name",
    "consortium_roster",
    "enrolled_identity",
    "format_roster",
    "load_key",
    "load_roster",
    "new_key",
    "parse_peer_id",
    "read_pub",
    "save_roster",
    "save_signed_roster",
    "write_axl_pem",
]

KEY_SUFFIX = ".key"
PUB_SUFFIX = ".pub"
ROSTER_FILE = "roster.json"
# The coordinator and validator look these roles up as "the one member with this role"; a
# second one would be silently ignored, so the roster refuses it instead.
SINGLETON_ROLES: frozenset[Role] = frozenset({"router", "auditor", "validator", "coordinator"})
# Names end up in Ray actor names ("hospital:NAME@run") and custom resources ("hospital:NAME").
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class NewKey:
    """What ``keys new`` wrote: the peer id and both files."""

    name: str
    peer_id: str
    key_file: Path
    pub_file: Path


def check_name(name: str) -> str:
    """A member or key name: letters, digits, ``.``, ``_``, ``-``; at most 64 characters."""
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a fresh 0600 file next to ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_public(path: Path, text: str) -> None:
    _write_private(path, text)
    path.chmod(0o644)


def new_key(name: str, directory: Path, *, force: bool = False) -> NewKey:
    """Create ``DIR/NAME.key`` (0600 seed) and ``DIR/NAME.pub`` (peer id).

    Refuses to replace an existing key unless ``force``: the old identity would be lost and
    every roster that enrols it would have to change.
    """
    check_name(name)
    key_file = directory / f"{name}{KEY_SUFFIX}"
    pub_file = directory / f"{name}{PUB_SUFFIX}"
    if key_file.exists() and not force:
        raise ConfigError(
            f"{key_file} already exists; pass --force to replace it (the old identity is lost)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident = Identity.generate()
        _write_private(key_file, ident.seed.hex() + "\n")
        _write_public(pub_file, ident.peer_id + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write key files in {directory}: {exc.strerror}") from None
    return NewKey(name, ident.peer_id, key_file, pub_file)


def load_key(path: Path) -> Identity:
    """Read a key file, refusing one that others can read (as :meth:`Identity.load` does)."""
    try:
        return Identity.load(path)
    except FileNotFoundError:
        raise ConfigError(f"no key file at {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a key file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None


def parse_peer_id(text: str) -> str:
    """Normalise a peer id (64 hex, any case) and check it is a usable Ed25519 public key."""
    peer_id = text.strip().lower()
    if len(peer_id) != 64 or any(c not in "0123456789abcdef" for c in peer_id):
        raise ConfigError(f"a peer id is 64 hex characters, got {text.strip()[:80]!r}")
    try:
        curve_public_key(peer_id)  # nobody could seal to a key that has no X25519 twin
    except Exception:
        raise ConfigError(f"{peer_id[:12]}… is not a valid Ed25519 public key") from None
    return peer_id


def read_pub(path: Path) -> str:
    """The peer id stored in a ``.pub`` file."""
    try:
        return parse_peer_id(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no public key file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read public key file {path}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_roster(path: Path, *, missing_ok: bool = False) -> Roster:
    """Read a roster file; an absent file is an empty roster only when ``missing_ok``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return Roster()
        raise ConfigError(f"no roster at {path}; create it with `medimesh roster add`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read roster {path}: {exc}") from None
    try:
        return Roster.from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_roster(roster: Roster, path: Path) -> None:
    """Replace the roster file atomically: a reader sees the old or the new roster, never half."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_public(path, roster.to_json() + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write roster {path}: {exc.strerror}") from None


def save_signed_roster(text: str, path: Path) -> None:
    """Replace a roster file with a signed copy (medimesh.signed_roster), atomically."""
    try:
        _write_public(path, text.rstrip("\n") + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write roster {path}: {exc.strerror}") from None


def add_member(path: Path, name: str, role: str, peer_id: str) -> Member:
    """Enrol one member in the roster file (created if absent) and return it."""
    check_name(name)
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    peer_id = parse_peer_id(peer_id)
    roster = load_roster(path, missing_ok=True)
    if peer_id in roster:
        other = roster.get(peer_id)
        raise ConfigError(
            f"peer {peer_id[:12]}… is already enrolled as {other.name!r} ({other.role})"
        )
    same_name = [m for m in roster if m.name == name]
    if same_name:
        raise ConfigError(f"a member named {name!r} is already enrolled ({same_name[0].role})")
    holders = roster.with_role(role)
    if role in SINGLETON_ROLES and holders:
        raise ConfigError(f"a consortium has one {role}; {holders[0].name!r} already is")
    member = Member(name, role, peer_id)
    roster.add(member)
    save_roster(roster, path)
    return member


def format_roster(roster: Roster) -> str:
    """A fixed-width table: name, role, full peer id (what operators compare by eye)."""
    rows = [("NAME", "ROLE", "PEER ID")] + [(m.name, m.role, m.peer_id) for m in roster]
    wide = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{wide[0]}}  {r[1]:<{wide[1]}}  {r[2]}" for r in rows)


def enrolled_identity(keys_dir: Path, roster: Roster, name: str, role: Role) -> Identity:
    """Load ``keys_dir/NAME.key`` and check the roster enrols exactly that key as ``role``."""
    ident = load_key(keys_dir / f"{name}{KEY_SUFFIX}")
    try:
        member = roster.by_name(name)
    except NotEnrolled:
        raise ConfigError(
            f"the roster does not enrol {name!r}; run `medimesh roster add`"
        ) from None
    if member.role != role:
        raise ConfigError(f"the roster enrols {name!r} as {member.role}, not {role}")
    if member.peer_id != ident.peer_id:
        raise ConfigError(
            f"{keys_dir / (name + KEY_SUFFIX)} holds peer {ident.peer_id[:12]}…, but the roster "
            f"enrols {name!r} as {member.peer_id[:12]}…"
        )
    return ident


def consortium_roster(keys_dir: Path, site_names: list[str]) -> Roster:
    """``keys_dir/roster.json``, checked against the hospitals a run will start.

    An enrolled hospital that no site runs would never answer: every broadcast to it fails as
    unreachable. Refusing here names it before any actor starts.
    """
    roster = load_roster(keys_dir / ROSTER_FILE)
    idle = sorted(m.name for m in roster.with_role("hospital") if m.name not in site_names)
    if idle:
        raise ConfigError(
            f"the roster enrols hospital(s) {', '.join(idle)} that this run does not start; "
            "add their sites or remove them from the roster"
        )
    return roster


# PKCS#8 wrapping of a raw Ed25519 seed (RFC 8410): what `openssl genpkey -algorithm ed25519`
# writes and what an AXL node reads from its PrivateKeyPath.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")


def axl_pem(identity: Identity) -> str:
    """The identity as the PEM private key an AXL node loads, so its peer id is the same."""
    b64 = base64.b64encode(_PKCS8_ED25519 + identity.seed).decode()
    return f"-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"


def write_axl_pem(identity: Identity, path: Path, *, force: bool = False) -> None:
    """Write :func:`axl_pem` to a 0600 file, refusing to replace one unless ``force``."""
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, axl_pem(identity))
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
