"""Who may connect to the embedded PostgreSQL: the settings, and the checks on them (no I/O).

pgserver initialises its data directory with ``--auth=trust`` for the socket and for TCP, and,
when its data path is too long for a socket name, puts the socket in a runtime directory it
makes world-writable (0777). Together that let any local OS user connect as the superuser.
``medimesh.store.embedded_server`` replaces that with what this module writes:

- ``pg_hba.conf``: the socket uses ``peer`` authentication through the ``medimesh`` map, so
  only the OS user who started the server (and root) may log in, as any role; TCP from
  loopback asks for a password (``scram-sha-256``; no role has one, so none gets in). Nothing
  is ``trust``.
- ``pg_ident.conf``: the map, one line per allowed OS user.
- ``postgresql.conf``: ``unix_socket_permissions = 0700`` and ``listen_addresses = ''``
  (pgserver already starts the server with no TCP listener; this keeps a manual start alike).
- the socket directory: owned by the server's OS user, mode 0700.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

__all__ = [
    "CONF_MARK",
    "IDENT_MAP",
    "SOCKET_DIR_MODE",
    "conf_lines",
    "hba_problems",
    "hba_text",
    "ident_text",
    "mode_problems",
]

IDENT_MAP = "medimesh"
SOCKET_DIR_MODE = 0o700
CONF_MARK = "# medimesh: local access only (medimesh/pg_auth.py)"


def hba_text() -> str:
    """The pg_hba.conf MediMesh runs its embedded server with."""
    return "\n".join([
        "# Written by MediMesh (medimesh/pg_auth.py); pgserver's 'trust' lines were replaced.",
        "# TYPE  DATABASE     USER  ADDRESS        METHOD",
        f"local   all          all                  peer map={IDENT_MAP}",
        "host    all          all   127.0.0.1/32   scram-sha-256",
        "host    all          all   ::1/128        scram-sha-256",
        f"local   replication  all                  peer map={IDENT_MAP}",
        "host    replication  all   127.0.0.1/32   scram-sha-256",
        "host    replication  all   ::1/128        scram-sha-256",
        "",
    ])


def ident_text(os_users: Iterable[str]) -> str:
    """pg_ident.conf: each of ``os_users`` may log in as any role over the socket."""
    users = sorted(set(os_users))
    for u in users:
        if not u or any(c.isspace() for c in u) or u.startswith(("/", '"')):
            raise ValueError(f"unusable OS user name {u!r} for pg_ident.conf")
    lines = ["# Written by MediMesh (medimesh/pg_auth.py): OS user -> any database role."]
    lines += [f"{IDENT_MAP}  {u}  all" for u in users]
    return "\n".join(lines) + "\n"


def conf_lines() -> list[str]:
    """Lines appended (once, after :data:`CONF_MARK`) to postgresql.conf."""
    return [CONF_MARK, "unix_socket_permissions = 0700", "listen_addresses = ''"]


def hba_problems(rules: Iterable[tuple[str, str]]) -> list[str]:
    """Problems in loaded rules, as ``(type, auth_method)`` pairs (``pg_hba_file_rules``)."""
    out = []
    for kind, method in rules:
        if method in ("trust", "password"):
            out.append(f"{kind} connections use {method!r} authentication")
    return out


def mode_problems(what: str, mode: int) -> list[str]:
    """A socket or its directory that other users may reach or change."""
    perms = stat.S_IMODE(mode)
    out = []
    if perms & stat.S_IWOTH:
        out.append(f"{what} is world-writable ({perms:o})")
    if perms & (stat.S_IROTH | stat.S_IXOTH | stat.S_IWGRP | stat.S_IXGRP):
        out.append(f"{what} is open to other users ({perms:o})")
    return out
