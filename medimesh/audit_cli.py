"""``medimesh audit verify | show | provenance``: read the trail and model lineage from the store.

These commands trust nothing in the database: ``verify`` recomputes every hash and both
signatures (the append-only trigger stops accidents, not a superuser), takes the signers it
accepts from signed roster files (``--roster``), never from the database, and checks the
chain against the heads hospitals witnessed (``--witness``). Results go to the real stdout
via ``medimesh.cli.emit``; ``verify`` exits 1 when the chain is broken or was not fully
checked, so scripts and CI can gate on it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from medimesh.errors import MediMeshError
from medimesh.trail_check import NOT_CHECKED

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

    from medimesh.identity import Roster
    from medimesh.store import Store, StoredModel
    from medimesh.witness import SignedHead

__all__ = [
    "add_audit_commands", "check_trail", "read_signed_rosters", "read_witness", "resolve_database",
]

T = TypeVar("T")
_HEX = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 8


def _emit(text: str) -> None:
    from medimesh.cli import emit  # lazy: medimesh.cli imports this module

    emit(text)


def resolve_database(url: str | None, data_dir: str | None) -> tuple[str, PostgresServer | None]:
    """``--database-url``, else ``$MEDIMESH_DATABASE_URL``, else the embedded server.

    The embedded server is only started over an existing data directory: auditing an empty,
    freshly initialised database would report a meaningless "intact, 0 entries".
    """
    from medimesh.store import DATABASE_URL_ENV, default_data_dir, embedded_server

    if url:
        return url, None
    env = os.environ.get(DATABASE_URL_ENV)
    if env:
        return env, None
    path = (Path(data_dir) if data_dir else default_data_dir()).expanduser().resolve()
    if not (path / "PG_VERSION").is_file():
        raise MediMeshError(f"no audit database at {path}; run medimesh demo first")
    server = embedded_server(path)
    return str(server.get_uri()), server


def _with_store(args: argparse.Namespace, op: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store, run one operation, close everything (including an embedded server)."""
    from medimesh.store import Store

    url, server = resolve_database(args.database_url, getattr(args, "data_dir", None))

    async def run() -> T:
        async with await Store.open(url) as store:
            return await op(store)

    try:
        return asyncio.run(run())
    finally:
        if server is not None:
            server.cleanup()  # stops it only if no other process holds a handle


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=None,
                   help="PostgreSQL URL (default: $MEDIMESH_DATABASE_URL, else the embedded one)")
    p.add_argument("--data-dir", default=None,
                   help="embedded PostgreSQL data directory (default .medimesh/pg)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("-v", "--verbose", action="store_true")


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_audit_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``audit verify|show|provenance`` on the ``medimesh`` sub-parsers."""
    audit = sub.add_parser("audit", help="verify and inspect the audit trail and model lineage")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    verify = asub.add_parser("verify", help="recompute every hash and signature; exit 1 if broken")
    _db_args(verify)
    verify.add_argument("--roster", type=Path, action="append", default=[], metavar="FILE",
                        help="a signed roster file (or a directory of them) whose members are "
                             "the trusted signers; repeatable. Without one: not a pass")
    verify.add_argument("--witness", type=Path, default=None, metavar="DIR",
                        help="check the chain against every witnessed head in DIR/**/heads.jsonl")
    verify.set_defaults(func=cmd_verify)

    show = asub.add_parser("show", help="list audit entries (newest last)")
    _db_args(show)
    show.add_argument("--round", type=int, default=None, help="only this round")
    show.add_argument("--event", default=None, help="only this event type")
    show.add_argument("--limit", type=_nonnegative, default=50,
                      help="the newest N matching entries (0: all; default 50)")
    show.set_defaults(func=cmd_show)

    prov = asub.add_parser("provenance", help="a model's lineage back to the initial model")
    prov.add_argument("model_hash", metavar="MODEL_HASH",
                      help=f"full hash or a unique prefix of >= {MIN_PREFIX} hex characters")
    prov.add_argument("--roster", default=None, metavar="FILE",
                      help="signed roster file (or directory) whose coordinator must sign "
                           "model_published entries "
                           "(default: the nodes enrolled in the database)")
    prov.add_argument("--strict", action="store_true",
                      help="exit 1 unless every published model of the lineage is vouched for")
    _db_args(prov)
    prov.set_defaults(func=cmd_provenance)


# ---------------------------------------------------------------------------------- verify


def read_signed_rosters(paths: list[Path]) -> list[Roster]:
    """The verified rosters of ``paths`` (files, or directories of ``*.json`` roster files);
    any copy that does not carry every member's valid signature is an error."""
    from medimesh.signed_roster import verify_signed_roster

    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if paths and not files:
        raise MediMeshError(f"no roster files in {', '.join(map(str, paths))}")
    out = []
    for f in files:
        try:
            out.append(verify_signed_roster(f.read_text()))
        except OSError as exc:
            raise MediMeshError(f"cannot read roster {f}: {exc.strerror}") from None
        except MediMeshError as exc:
            raise MediMeshError(f"{f}: {exc}") from None
    return out


def read_witness(directory: Path) -> list[tuple[str, SignedHead]]:
    """Every head in every ``heads.jsonl`` under ``directory``, named by its folder (the site)."""
    from medimesh.witness import HEADS_FILE, parse_heads

    if not directory.is_dir():
        raise MediMeshError(f"no witness directory at {directory}")
    out = []
    for f in sorted(directory.rglob(HEADS_FILE)):
        who = str(f.parent.relative_to(directory)) or f.parent.name
        try:
            out += [(who, h) for h in parse_heads(f.read_text())]
        except MediMeshError as exc:
            raise MediMeshError(f"{f}: {exc}") from None
    if not out:
        raise MediMeshError(f"no witnessed chain heads under {directory}")
    return out


async def check_trail(
    store: Store,
    rosters: list[Roster] | None,
    heads: Sequence[tuple[str, SignedHead]] = (),
) -> dict[str, Any]:
    """The whole verdict (medimesh.trail_check): chain, signers from ``rosters`` (None: not
    checked, never a pass), per-actor gaps and witnessed heads."""
    from medimesh.actor_seq import actor_gaps
    from medimesh.store import verify
    from medimesh.trail_check import signer_sets, trail_verdict
    from medimesh.witness import check_heads

    known, writers = signer_sets(rosters or [])
    report = await verify(store, known if rosters is not None else None)
    entries = [e async for e in store.iter_entries()]
    names = {m.peer_id: m.name for r in rosters or [] for m in r}
    return trail_verdict(
        report,
        rosters is not None,
        actor_gaps(entries),
        check_heads(entries, heads, writers if rosters is not None else None),
        names,
        heads_checked=len(heads),
    )


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 only when the chain is intact, its signers were checked against a signed roster,
    no actor's sequence has a hole and no witnessed head is contradicted; else 1, naming it."""
    rosters = read_signed_rosters(args.roster) if args.roster else None
    heads = read_witness(args.witness) if args.witness else []

    async def check(store: Store) -> dict[str, Any]:
        return await check_trail(store, rosters, heads)

    doc = _with_store(args, check)
    n_known = len({m.peer_id for r in rosters or [] for m in r})
    if args.json:
        _emit(json.dumps({**doc, "known_signers": n_known}))
    elif doc["ok"]:
        _emit(
            f"audit trail intact: {doc['entries']} entries, head {doc['head_hash'][:16]}…, "
            f"{n_known} enrolled signers from the signed roster, "
            f"{doc['heads_checked']} witnessed heads"
        )
    elif doc["chain_ok"] and doc["problems"] == [NOT_CHECKED]:
        _emit(
            f"audit trail NOT VERIFIED: chain of {doc['entries']} entries recomputes, but "
            f"{NOT_CHECKED}; the database's own node list is not trusted"
        )
    else:
        where = f"at seq {doc['broken_seq']}" if doc["broken_seq"] is not None else ""
        _emit(f"audit trail BROKEN {where}: {doc['problem']}".replace("  ", " "))
        for extra in doc["problems"][1:]:
            _emit(f"  also: {extra}")
    return 0 if doc["ok"] else 1


# ------------------------------------------------------------------------------------ show


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_show(args: argparse.Namespace) -> int:
    """The newest entries as a table, or one JSON object per line with ``--json``."""
    from medimesh.audit import canonical

    async def fetch(store: Store) -> tuple[list[Any], dict[str, str]]:
        names = {n.peer_id: n.name for n in await store.nodes()}
        if args.limit:
            rows = await store.tail(args.limit, event=args.event, round=args.round)
        else:
            rows = await store.entries(event=args.event, round=args.round)
        return rows, names

    rows, names = _with_store(args, fetch)
    if args.json:
        lines = [
            json.dumps({**asdict(e), "actor_name": names.get(e.actor)}, ensure_ascii=False)
            for e in rows
        ]
        if lines:
            _emit("\n".join(lines))
        return 0
    out = [f"{'seq':>7}  {'time (UTC)':19}  {'actor':16}  {'event':22}  {'round':>5}  "
           f"{'subject':12}  body"]
    for e in rows:
        when = dt.datetime.fromtimestamp(e.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        actor = names.get(e.actor, e.actor[:12] + "…")
        body = canonical(e.body).decode()
        out.append(
            f"{e.seq:>7}  {when:19}  {_short(actor, 16):16}  {_short(e.event, 22):22}  "
            f"{e.round:>5}  {e.subject[:12]:12}  {_short(body, 60)}"
        )
    out.append(f"({len(rows)} entries)")
    _emit("\n".join(out))
    return 0


# ------------------------------------------------------------------------------ provenance


def _resolve_model(models: list[StoredModel], wanted: str) -> StoredModel:
    """Exact hash, or a unique prefix of at least MIN_PREFIX hex characters."""
    key = wanted.strip().lower()
    if not _HEX.match(key):
        raise MediMeshError(f"{wanted!r} is not a hex model hash")
    exact = [m for m in models if m.model_hash == key]
    if exact:
        return exact[0]
    if len(key) < MIN_PREFIX:
        raise MediMeshError(
            f"no model {key!r}; give the full hash or a prefix of >= {MIN_PREFIX} hex characters"
        )
    hits = [m for m in models if m.model_hash.startswith(key)]
    if not hits:
        raise MediMeshError(f"no model with hash {key} in the store ({len(models)} models stored)")
    if len(hits) > 1:
        raise MediMeshError(f"prefix {key} is ambiguous: {len(hits)} models match")
    return hits[0]


def _lineage(models: list[StoredModel], start: StoredModel) -> tuple[list[StoredModel], str]:
    """Follow parents to the initial model; the note says why a walk stopped early."""
    by_hash = {m.model_hash: m for m in models}
    chain, seen = [start], {start.model_hash}
    while chain[-1].parent_hash:
        parent = chain[-1].parent_hash
        if parent in seen:
            return chain, f"cycle at {parent[:16]}…"
        if parent not in by_hash:
            return chain, f"parent {parent[:16]}… is not in the store"
        seen.add(parent)
        chain.append(by_hash[parent])
    return chain, ""


async def _vouches(
    store: Store, chain: list[StoredModel], roster_file: str | None
) -> list[dict[str, Any]]:
    """Per model: do its weights hash to its name, and which signed model_published entry
    vouches for its weights and its run's standardization (medimesh.release), or why none."""
    from medimesh.identity import Member
    from medimesh.model import model_hash
    from medimesh.release import UnvouchedModel, find_voucher, roster_keys

    members: list[Member] = (  # a signed roster (file or directory) that verifies, or the nodes
        [m for r in read_signed_rosters([Path(roster_file)]) for m in r]
        if roster_file is not None
        else [n.member() for n in await store.nodes()]  # every run's members, names repeat
    )
    coordinators, signers = roster_keys(members)
    out: list[dict[str, Any]] = []
    for m in chain:
        model = m.to_model()
        doc: dict[str, Any] = {"weights_match": model_hash(model) == m.model_hash,
                               "vouched_by": None, "vouch_problem": ""}
        out.append(doc)
        if m.parent_hash is None:
            continue  # the initial model: announced by setup_completed, never served as such
        entries = [e for e in await store.entries(event="model_published", round=m.round)
                   if e.subject == m.model_hash]
        problems: list[str] = []
        for run in dict.fromkeys(str(e.body.get("run_id", "")) for e in entries):
            cp = await store.latest_checkpoint(run)
            state = {} if cp is None else cp.state
            if "mean" not in state or "std" not in state:
                problems.append(f"run {run} has no checkpoint with the standardization")
                continue
            spec = next((str(e.body.get("spec_hash", "")) for e in entries), "")
            try:
                doc["vouched_by"] = find_voucher(
                    entries, model=model, mean=state["mean"], std=state["std"], spec_hash=spec,
                    run_id=run, coordinators=coordinators, signers=signers,
                ).to_dict()
                break
            except UnvouchedModel as exc:
                problems.append(str(exc))
        if doc["vouched_by"] is None:
            doc["vouch_problem"] = "; ".join(problems) or (
                f"no model_published audit entry names model {m.model_hash[:12]}…")
    return out


def cmd_provenance(args: argparse.Namespace) -> int:
    """For each model back to the initial one: round, parent, update and verdict digests,
    whether its weights match its hash and which signed entry vouches for it."""

    async def fetch(store: Store) -> tuple[list[StoredModel], list[dict[str, Any]]]:
        models = await store.models()
        chain, _ = _lineage(models, _resolve_model(models, args.model_hash))
        return models, await _vouches(store, chain, args.roster)

    models, vouches = _with_store(args, fetch)
    chain, note = _lineage(models, _resolve_model(models, args.model_hash))
    unvouched = [m.model_hash for m, v in zip(chain, vouches, strict=True)
                 if m.parent_hash is not None and (v["vouched_by"] is None
                                                   or not v["weights_match"])]
    code = 1 if args.strict and unvouched else 0
    if args.json:
        doc = {
            "model_hash": chain[0].model_hash,
            "complete": not note,
            "note": note,
            "lineage": [
                {
                    "model_hash": m.model_hash,
                    "round": m.round,
                    "parent_hash": m.parent_hash,
                    "updates": m.provenance.get("updates", []),
                    "verdicts": m.provenance.get("verdicts", []),
                    "shape": list(m.shape),
                    "created_at": m.created_at,
                    **v,
                }
                for m, v in zip(chain, vouches, strict=True)
            ],
            "unvouched": unvouched,
        }
        _emit(json.dumps(doc))
        return code
    out: list[str] = []
    for m, v in zip(chain, vouches, strict=True):
        updates = m.provenance.get("updates", [])
        verdicts = m.provenance.get("verdicts", [])
        parent = f"{m.parent_hash[:16]}…" if m.parent_hash else "(initial model)"
        out.append(f"round {m.round:>4}  model {m.model_hash}  parent {parent}")
        out.append(f"            {len(updates)} accepted update(s), {len(verdicts)} verdict(s)")
        if not v["weights_match"]:
            out.append("            WEIGHTS CHANGED: the stored weights do not hash to this name")
        if v["vouched_by"] is not None:
            out.append(f"            published in audit seq {v['vouched_by']['seq']} "
                       f"(entry {v['vouched_by']['entry_hash'][:16]}…)")
        elif m.parent_hash is not None:
            out.append(f"            NOT VOUCHED FOR: {v['vouch_problem']}")
        out.extend(f"              update  {d}" for d in updates)
        out.extend(f"              verdict {d}" for d in verdicts)
    done = f"{len(chain)} model(s) back to the initial model"
    out.append(f"lineage incomplete: {note}" if note else done)
    if unvouched:
        out.append(f"{len(unvouched)} published model(s) without a verified model_published entry")
    _emit("\n".join(out))
    return code
