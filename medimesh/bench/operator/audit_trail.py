"""Operator attacks: audit_trail (issue 15, attacks 2 and 5); see the package docstring.

The operator holds the audit writer's key, the coordinator's key and the database's owner
role. Each scenario runs a small real federation (Ray actors, embedded PostgreSQL, PyNaCl keys)
whose hospitals witness the writer's signed chain heads in their own directories, tampers with
the trail as that operator would, then runs ``medimesh audit verify`` as a subprocess with the
signed roster and the witness directory — what an outside auditor holds — and reports its exit
code and the entry or sequence number it names. The four trail attacks also take a finished
federation's :class:`Trail` and tamper with their own copy of its database (the tests run one
federation for all four; the bench runs each scenario on its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medimesh.audit import AuditChain, AuditEntry, AuditEvent, sign_event
from medimesh.bench.operator import AttackOutcome, Lab, Scenario
from medimesh.identity import Identity

__all__ = ["SCENARIOS", "Trail", "federation", "own_trail", "verify_cli"]

ROUNDS = 2
HOSPITALS = 3


@dataclasses.dataclass
class Trail:
    """What a finished federation left: its database, roster file, witness logs and keys."""

    url: str
    roster_file: Path
    witness_dir: Path
    writer: Identity
    coordinator: Identity
    names: dict[str, str]  # peer id -> member name
    witnessed: int  # the length every hospital witnessed last


def _wait_witnessed(witness_dir: Path, sites: Sequence[str], length: int, timeout: float) -> int:
    """Until every site's newest witnessed head has at least ``length`` entries."""
    deadline = time.monotonic() + timeout
    while True:
        lows = []
        for s in sites:
            f = witness_dir / s / "heads.jsonl"
            lines = f.read_text().splitlines() if f.exists() else []
            lows.append(json.loads(lines[-1])["length"] if lines else 0)
        if min(lows) >= length or time.monotonic() > deadline:
            return min(lows)
        time.sleep(0.1)


def federation(lab: Lab, seed: int = 0) -> Trail:
    """Run a small federation to the end on a fresh database; hospitals witness its heads."""
    import ray

    from medimesh.actors.runtime import Consortium, RunConfig

    url = lab.new_database()
    roster_dir, witness_dir = lab.subdir("rosters"), lab.subdir("witness")
    cfg = RunConfig(hospitals=HOSPITALS, rounds=ROUNDS, seed=seed, database_url=url,
                    roster_dir=str(roster_dir), witness_dir=str(witness_dir),
                    cross_baselines=False)
    fed = Consortium(cfg)
    try:
        fed.start()
        fed.run()
        fed.flush_store()
        head = ray.get(fed.handles["auditor"].witness_head.remote())
        sites = [d.name for d in fed.descriptors]
        witnessed = _wait_witnessed(witness_dir, sites, int(head["length"]), 20.0)
        fed.flush_store()
        roster_file = fed.signed_roster_path
        assert roster_file is not None
        return Trail(url, roster_file, witness_dir, fed.identities["auditor"],
                     fed.identities["coordinator"],
                     {i.peer_id: n for n, i in fed.identities.items()}, witnessed)
    finally:
        fed.shutdown()


def own_trail(lab: Lab, trail: Trail | None) -> Trail:
    """The trail a scenario tampers with: a copy, in the lab, of ``trail``'s database (one
    finished federation the caller shares among several scenarios; its roster and witness
    files are only read), or, without one, a federation of the scenario's own."""
    if trail is None:
        return federation(lab)
    return dataclasses.replace(trail, url=lab.copy_database(trail.url))


def verify_cli(trail: Trail, *, roster: bool = True, witness: bool = True) -> dict[str, Any]:
    """``medimesh audit verify --json`` as an outside auditor runs it: exit code and report."""
    args = ["audit", "verify", "--database-url", trail.url, "--json"]
    if roster:
        args += ["--roster", str(trail.roster_file)]
    if witness:
        args += ["--witness", str(trail.witness_dir)]
    done = subprocess.run(
        [sys.executable, "-c", "from medimesh.cli import main; raise SystemExit(main())", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return {"exit": done.returncode, "report": report, "stderr": done.stderr[-500:]}


def _owner(url: str, *statements: str) -> None:
    """Run SQL as the database's owner (the hostile operator's role)."""
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def _entries(url: str) -> list[AuditEntry]:
    from medimesh.store import Store

    async def go() -> list[AuditEntry]:
        async with await Store.open(url) as store:
            return [e async for e in store.iter_entries()]

    return asyncio.run(go())


def _replace_from(url: str, seq: int, entries: Sequence[AuditEntry]) -> None:
    """As the owner: drop every entry from ``seq`` on and store ``entries`` in their place."""
    from medimesh.store import Store

    _owner(url, "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only",
           f"DELETE FROM audit_entries WHERE seq >= {int(seq)}",
           "ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_append_only")

    async def go() -> None:
        async with await Store.open(url) as store:
            await store.append_entries(list(entries))

    asyncio.run(go())


def _rechain(writer: Identity, before: AuditEntry | None, events: Sequence[AuditEvent]) -> list[
        AuditEntry]:
    """Re-hash and re-sign ``events`` after ``before`` with the writer's key (the operator's)."""
    chain = AuditChain(writer, before.seq, before.entry_hash) if before else AuditChain(writer)
    return chain.extend(events)


def _verdict(check: dict[str, Any]) -> tuple[bool, str]:
    r = check["report"]
    detected = check["exit"] == 1 and not r.get("ok", True)
    return detected, f"audit verify exit {check['exit']}: {r.get('problem', '')}"


# ------------------------------------------------------------------------------ scenarios


def audit_empty_signers(lab: Lab, trail: Trail | None = None) -> AttackOutcome:
    """Empty ``nodes`` and append an event signed by a key nobody enrolled (chained with the
    writer's key): today's verify took signers from ``nodes``, so an empty table switched the
    check off. Now signers come from the signed roster; without one, no pass."""
    trail = own_trail(lab, trail)
    _owner(trail.url, "DELETE FROM nodes")
    rows = _entries(trail.url)
    mallory = Identity.generate()
    forged = sign_event(mallory, "model_published", ROUNDS + 1, "f" * 64,
                        {"model_hash": "f" * 64, "note": "served by the operator"})
    _replace_from(trail.url, rows[-1].seq + 1, _rechain(trail.writer, rows[-1], [forged]))
    with_roster = verify_cli(trail, witness=False)
    without = verify_cli(trail, roster=False, witness=False)
    detected, how = _verdict(with_roster)
    refused_unchecked = without["exit"] == 1 and not without["report"].get("signers_checked")
    return AttackOutcome(
        "audit_empty_signers", 2, True, detected and refused_unchecked,
        "audit verify --roster", how + f"; without --roster: exit {without['exit']}, "
        f"{without['report'].get('problem', '')}",
        "nothing (the forged entry is named; the nodes table is not consulted)",
        {"forged_seq": rows[-1].seq + 1, "with_roster": with_roster, "without_roster": without},
    )


def audit_truncate(lab: Lab, trail: Trail | None = None) -> AttackOutcome:
    """Delete the newest entries as the database owner (trigger disabled): the chain that is
    left is intact, so only the heads the hospitals witnessed can show the cut."""
    trail = own_trail(lab, trail)
    cut_from = trail.witnessed - 4
    _owner(trail.url, "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only",
           f"DELETE FROM audit_entries WHERE seq >= {cut_from}",
           "ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_append_only")
    without_witness = verify_cli(trail, witness=False)
    check = verify_cli(trail)
    detected, how = _verdict(check)
    return AttackOutcome(
        "audit_truncate", 2, True, detected, "audit verify --witness", how,
        f"entries {cut_from}.. deleted from the database (named; the witnesses still hold the "
        "heads)",
        {"cut_from": cut_from, "witnessed": trail.witnessed, "check": check,
         "without_witness": without_witness},
    )


def audit_rewrite(lab: Lab, trail: Trail | None = None) -> AttackOutcome:
    """Rewrite a coordinator entry (the operator holds that key too), re-sign it and re-hash the
    rest of the chain with the writer's key: every hash and signature verifies, no actor sequence
    has a hole — the witnessed heads do not match any more."""
    trail = own_trail(lab, trail)
    rows = _entries(trail.url)
    coord = trail.coordinator.peer_id
    target = next(e for e in rows if e.actor == coord and e.seq < trail.witnessed - 2)
    body = {**target.body, "rewritten_by": "operator"}
    new = sign_event(trail.coordinator, target.event, target.round, target.subject, body,
                     at=target.at)
    events = [new] + [e.as_event() for e in rows if e.seq > target.seq]
    before = next((e for e in rows if e.seq == target.seq - 1), None)
    _replace_from(trail.url, target.seq, _rechain(trail.writer, before, events))
    without_witness = verify_cli(trail, witness=False)
    check = verify_cli(trail)
    detected, how = _verdict(check)
    return AttackOutcome(
        "audit_rewrite", 2, True, detected, "audit verify --witness", how,
        f"entry {target.seq} ({target.event}) rewritten in the database (named via the "
        "witnessed heads)",
        {"rewritten_seq": target.seq, "check": check, "without_witness": without_witness},
    )


def audit_omit_event(lab: Lab, trail: Trail | None = None) -> AttackOutcome:
    """The writer leaves one validator event out and re-chains the rest with its own key: the
    validator's own sequence numbers (signed by the validator) show the hole."""
    trail = own_trail(lab, trail)
    rows = _entries(trail.url)
    validator = next(p for p, n in trail.names.items() if n == "validator")
    theirs = [e for e in rows if e.actor == validator and "actor_seq" in e.body]
    target = theirs[len(theirs) // 2]
    events = [e.as_event() for e in rows if e.seq > target.seq]
    before = next((e for e in rows if e.seq == target.seq - 1), None)
    _replace_from(trail.url, target.seq, _rechain(trail.writer, before, events))
    no_witness = verify_cli(trail, witness=False)
    check = verify_cli(trail)
    detected, how = _verdict(no_witness)
    gaps = no_witness["report"].get("actor_gaps", [])
    return AttackOutcome(
        "audit_omit_event", 2, True, detected and bool(gaps), "audit verify (actor sequence)",
        how, f"validator event {target.body['actor_seq']} ({target.event}) missing from the "
        "trail (named)",
        {"omitted_seq": target.seq, "omitted_actor_seq": target.body["actor_seq"],
         "actor": validator, "check_no_witness": no_witness, "check": check},
    )


class _Probe:
    """An audited actor that records events on demand (the flush path every actor shares)."""

    def __init__(self, seed: bytes, roster_json: str, auditor: Any) -> None:
        from medimesh.actors.base import Audited

        self._node = Audited(seed, roster_json, auditor)

    def record(self, n: int, start: int) -> int:
        for i in range(start, start + n):
            self._node.audit.record("probe", 0, "", {"i": i})
            self._node.flush_audit()  # one batch per event: each may be refused on its own
        return self._node.audit_refusals

    def sync(self) -> int:
        return self._node.sync_audit()

    def pending(self) -> int:
        return self._node.audit_pending()


def audit_backpressure_loss(lab: Lab) -> AttackOutcome:
    """The operator takes the database away until the writer's buffer is full: appends are
    refused with StoreBackpressure. Today the actor had already dropped its batch; now it keeps
    it and offers it again, and every event is chained once the database is back."""
    import ray

    from medimesh.actors.auditor import Auditor
    from medimesh.identity import Member, Roster
    from medimesh.signed_roster import sign_all

    url = lab.new_database()
    writer, probe_id = Identity.generate(), Identity.generate()
    roster = Roster([Member("auditor", "auditor", writer.peer_id),
                     Member("hospital-01", "hospital", probe_id.peer_id)])
    roster_file = lab.subdir("rosters") / "roster.json"
    roster_file.write_text(sign_all(roster, [writer, probe_id]))
    auditor: Any = ray.remote(Auditor).options(num_cpus=0).remote(
        writer.seed, roster.to_json(), database_url=url, max_buffer=3)
    probe: Any = ray.remote(_Probe).options(num_cpus=0).remote(
        probe_id.seed, roster.to_json(), auditor)
    from urllib.parse import urlsplit

    db = urlsplit(url).path.lstrip("/")
    admin = lab.admin_url
    try:
        ray.get(probe.record.remote(2, 0))
        ray.get(probe.sync.remote())
        _owner(admin, f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false',
               f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")
        total = 12
        refusals = 0
        for k in range(total - 2):
            refusals = ray.get(probe.record.remote(1, 2 + k))
            time.sleep(0.05)
        pending_down = ray.get(probe.pending.remote())
        _owner(admin, f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        deadline = time.monotonic() + 30
        while True:
            try:
                ray.get(probe.sync.remote())
                ray.get(auditor.flush.remote(10.0))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        stored = [e for e in _entries(url) if e.actor == probe_id.peer_id]
    finally:
        _owner(admin, f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        ray.get(auditor.close.remote())
        ray.kill(probe)
        ray.kill(auditor)
    trail = Trail(url, roster_file, lab.subdir("witness"), writer, writer,
                  {writer.peer_id: "auditor", probe_id.peer_id: "hospital-01"}, 0)
    check = verify_cli(trail, witness=False)
    numbers = sorted(e.body["i"] for e in stored)
    kept = numbers == list(range(total))
    return AttackOutcome(
        "audit_backpressure_loss", 5, True, kept and refusals > 0 and check["exit"] == 0,
        "hospital-01 (flush_audit keeps refused batches)",
        f"{refusals} append(s) refused with StoreBackpressure, kept and retried; "
        f"audit verify exit {check['exit']}",
        "nothing" if kept else f"events {sorted(set(range(total)) - set(numbers))} lost",
        {"recorded": total, "stored": len(numbers), "refusals": refusals,
         "pending_while_down": pending_down, "check": check},
    )


def audit_disable_trigger(lab: Lab) -> AttackOutcome:
    """With the application's database login (what the auditor actor connects as), try to
    switch the append-only trigger off, then update, delete and truncate the trail."""
    import asyncpg

    from medimesh.db_roles import ensure_app_role

    url = lab.new_database()
    app_url = asyncio.run(ensure_app_role(url))  # what the auditor actor writes with
    refused: dict[str, str] = {}
    statements = {
        "disable_trigger": "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only",
        "update": "UPDATE audit_entries SET subject = 'x'",
        "delete": "DELETE FROM audit_entries",
        "truncate": "TRUNCATE audit_entries",
        "drop": "DROP TABLE audit_entries",
    }

    async def attempt() -> str:
        conn = await asyncpg.connect(app_url)
        try:
            user = str(await conn.fetchval("SELECT current_user"))
            for name, sql in statements.items():
                try:
                    await conn.execute(sql)
                except asyncpg.PostgresError as exc:
                    refused[name] = f"{type(exc).__name__}: {exc}"
            return user
        finally:
            await conn.close()

    user = asyncio.run(attempt())
    all_refused = set(refused) == set(statements)
    return AttackOutcome(
        "audit_disable_trigger", 2, True, all_refused, f"PostgreSQL (role {user})",
        "; ".join(f"{k}: {v.split(':')[0]}" for k, v in refused.items()),
        "nothing" if all_refused else f"allowed: {sorted(set(statements) - set(refused))}",
        {"role": user, "refused": refused},
    )


SCENARIOS: dict[str, Scenario] = {
    "audit_empty_signers": audit_empty_signers,
    "audit_truncate": audit_truncate,
    "audit_rewrite": audit_rewrite,
    "audit_omit_event": audit_omit_event,
    "audit_backpressure_loss": audit_backpressure_loss,
    "audit_disable_trigger": audit_disable_trigger,
}
