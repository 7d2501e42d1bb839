"""``medimesh keys new|show|axl-pem`` and ``medimesh roster add|show``: identities and enrolment.

Each node runs ``keys new`` on its own machine, so its secret never travels; only the peer id
(stdout, and ``NAME.pub``) goes to whoever keeps the roster, who runs ``roster add`` for every
member and hands the roster file to all nodes. Results go to the real stdout via
``medimesh.cli.emit`` (``PID=$(medimesh keys new cleveland)`` works); notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medimesh.errors import ConfigError
from medimesh.identity import ROLES
from medimesh.keys import (
    add_member,
    format_roster,
    load_key,
    load_roster,
    new_key,
    parse_peer_id,
    read_pub,
    save_signed_roster,
    write_axl_pem,
)

__all__ = ["DEFAULT_KEYS_DIR", "DEFAULT_ROSTER", "add_keys_commands"]

DEFAULT_KEYS_DIR = Path(".medimesh") / "keys"
DEFAULT_ROSTER = Path(".medimesh") / "roster.json"


def _emit(text: str) -> None:
    from medimesh.cli import emit  # lazy: medimesh.cli imports this module

    emit(text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-v", "--verbose", action="store_true")


def add_keys_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``keys new|show`` and ``roster add|show`` on the ``medimesh`` sub-parsers."""
    keys = sub.add_parser("keys", help="create and inspect node identities (Ed25519 key files)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)

    new = ksub.add_parser("new", help="write DIR/NAME.key (0600) and NAME.pub; print the peer id")
    new.add_argument("name", metavar="NAME", help="the node's name, as it will be on the roster")
    new.add_argument("--dir", type=Path, default=DEFAULT_KEYS_DIR,
                     help=f"where to write the key files (default {DEFAULT_KEYS_DIR})")
    new.add_argument("--force", action="store_true",
                     help="replace an existing key (its identity is lost)")
    _common(new)
    new.set_defaults(func=cmd_keys_new)

    show = ksub.add_parser("show", help="print the peer id of a key file")
    show.add_argument("key_file", metavar="KEY_FILE", type=Path)
    _common(show)
    show.set_defaults(func=cmd_keys_show)

    pem = ksub.add_parser("axl-pem", help="export a key as the PEM file an AXL node loads")
    pem.add_argument("key_file", metavar="KEY_FILE", type=Path)
    pem.add_argument("--out", type=Path, required=True,
                     help="PEM file to write (mode 600), e.g. the node's private.pem")
    pem.add_argument("--force", action="store_true", help="replace an existing file")
    _common(pem)
    pem.set_defaults(func=cmd_keys_axl_pem)

    roster = sub.add_parser("roster", help="enrol members and inspect the consortium roster")
    rsub = roster.add_subparsers(dest="roster_command", required=True)

    add = rsub.add_parser("add", help="enrol a member (name, role, peer id) in the roster file")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, choices=ROLES)
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--peer-id", help="the member's peer id (64 hex, from `keys new`)")
    who.add_argument("--pub", type=Path, help="the member's NAME.pub file")
    add.add_argument("--roster", type=Path, default=DEFAULT_ROSTER,
                     help=f"roster file, created if absent (default {DEFAULT_ROSTER})")
    _common(add)
    add.set_defaults(func=cmd_roster_add)

    rshow = rsub.add_parser("show", help="list the enrolled members")
    rshow.add_argument("--roster", type=Path, default=DEFAULT_ROSTER,
                       help=f"roster file (default {DEFAULT_ROSTER})")
    _common(rshow)
    rshow.set_defaults(func=cmd_roster_show)

    rsign = rsub.add_parser("sign", help="add your signature to the roster file (every member "
                                          "signs; a copy is valid only with all signatures)")
    rsign.add_argument("--key", type=Path, required=True, help="your NAME.key file")
    rsign.add_argument("--roster", type=Path, default=DEFAULT_ROSTER,
                       help=f"roster file (default {DEFAULT_ROSTER})")
    _common(rsign)
    rsign.set_defaults(func=cmd_roster_sign)

    rverify = rsub.add_parser("verify", help="check that every member signed this roster copy")
    rverify.add_argument("--roster", type=Path, default=DEFAULT_ROSTER,
                         help=f"roster file (default {DEFAULT_ROSTER})")
    _common(rverify)
    rverify.set_defaults(func=cmd_roster_verify)


def cmd_keys_new(args: argparse.Namespace) -> int:
    made = new_key(args.name, args.dir, force=args.force)
    if args.json:
        _emit(json.dumps({"name": made.name, "peer_id": made.peer_id,
                          "key_file": str(made.key_file), "pub_file": str(made.pub_file)}))
    else:
        _emit(made.peer_id)
        print(f"wrote {made.key_file} (secret, mode 600) and {made.pub_file} (share this)",
              file=sys.stderr)
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    ident = load_key(args.key_file)
    _emit(json.dumps({"peer_id": ident.peer_id}) if args.json else ident.peer_id)
    return 0


def cmd_keys_axl_pem(args: argparse.Namespace) -> int:
    ident = load_key(args.key_file)
    write_axl_pem(ident, args.out, force=args.force)
    _emit(json.dumps({"peer_id": ident.peer_id, "pem": str(args.out)}) if args.json
          else ident.peer_id)
    print(f"wrote {args.out} (secret, mode 600): set PrivateKeyPath to it in node-config.json",
          file=sys.stderr)
    return 0


def cmd_roster_add(args: argparse.Namespace) -> int:
    peer_id = read_pub(args.pub) if args.pub is not None else parse_peer_id(args.peer_id)
    member = add_member(args.roster, args.name, args.role, peer_id)
    if args.json:
        _emit(json.dumps({"name": member.name, "role": member.role, "peer_id": member.peer_id}))
    else:
        print(f"enrolled {member.name} as {member.role} (peer {member.peer_id[:12]}…) "
              f"in {args.roster}", file=sys.stderr)
    return 0


def cmd_roster_show(args: argparse.Namespace) -> int:
    roster = load_roster(args.roster)
    _emit(roster.to_json() if args.json else format_roster(roster))
    return 0


def cmd_roster_sign(args: argparse.Namespace) -> int:
    from medimesh.signed_roster import add_signature

    ident = load_key(args.key)
    try:
        text = args.roster.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read roster {args.roster}: {exc.strerror}") from None
    signed = add_signature(text, ident)
    save_signed_roster(signed, args.roster)
    n = len(json.loads(signed)["signatures"])
    total = len(load_roster(args.roster))
    _emit(json.dumps({"peer_id": ident.peer_id, "signatures": n, "members": total})
          if args.json else f"signed by {ident.peer_id[:12]}…: {n} of {total} members signed")
    return 0


def cmd_roster_verify(args: argparse.Namespace) -> int:
    from medimesh.signed_roster import verify_signed_roster

    try:
        roster = verify_signed_roster(args.roster.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read roster {args.roster}: {exc.strerror}") from None
    _emit(json.dumps({"ok": True, "members": len(roster)}) if args.json
          else f"{args.roster}: signed by all {len(roster)} members")
    return 0
