"""``medimesh audit verify|show|provenance`` as subprocesses against a real PostgreSQL.

``medimesh.cli`` registers these commands itself; here a tiny driver builds the parser from
``add_audit_commands`` and mirrors ``main``'s error handling (MediMeshError -> exit 2), so the
tests exercise the commands exactly as the CLI runs them. Also: ``run_audit_bench`` at toy size.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import numpy as np
import pytest

from medimesh.actors.auditor import Auditor
from medimesh.audit import sign_event
from medimesh.bench.audit import run_audit_bench
from medimesh.identity import Identity, Member, Roster
from medimesh.model import Model, model_hash
from medimesh.signed_roster import sign_all
from medimesh.store import DATA_DIR_ENV, DATABASE_URL_ENV

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

T = TypeVar("T")

DRIVER = """
import argparse, sys
from medimesh.audit_cli import add_audit_commands
from medimesh.errors import MediMeshError
parser = argparse.ArgumentParser(prog="medimesh")
add_audit_commands(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
try:
    code = args.func(args)
except MediMeshError as exc:
    print(f"medimesh: error: {exc}", file=sys.stderr)
    code = 2
sys.exit(code)
"""


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def audit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``medimesh audit ARGS`` in a fresh interpreter."""
    base = {k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, DATA_DIR_ENV)}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, "audit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
        check=False,
    )


class Filled:
    """A database holding a small federation's trail and a three-model lineage."""

    def __init__(self, url: str, roster_file: Path | None = None) -> None:
        self.url = url
        coordinator, hospital, me = Identity.generate(), Identity.generate(), Identity.generate()
        roster = Roster(
            [
                Member("auditor", "auditor", me.peer_id),
                Member("coordinator", "coordinator", coordinator.peer_id),
                Member("st-marys", "hospital", hospital.peer_id),
            ]
        )
        self.roster = str(roster_file)
        if roster_file is not None:  # every member's signature: the verifier's trusted copy
            roster_file.write_text(sign_all(roster, [coordinator, hospital, me]))
        aud = Auditor(me.seed, roster.to_json(), database_url=url)
        try:
            events = [
                sign_event(
                    coordinator if i % 4 == 0 else hospital,
                    "round.opened" if i % 4 == 0 else "update.accepted",
                    i // 4,
                    subject=f"{i:064x}",
                    body={"i": i},
                )
                for i in range(12)
            ]
            aud.append(events[:6])
            aud.append(events[6:])
            self.hashes: list[str] = []
            for r in range(3):
                rng = np.random.default_rng(r)
                m = Model(rng.normal(size=(4, 2)), rng.normal(size=2))
                h = model_hash(m)
                updates = [f"{r}{k}" * 32 for k in range(r)]  # round 0 (initial): none
                verdicts = [f"{r}f" * 32] if r else []
                parent = self.hashes[-1] if self.hashes else ""
                aud.record_model(h, r, parent, m.weights, m.bias, updates, verdicts)
                self.hashes.append(h)
            assert aud.backlog() == 0
        finally:
            aud.close()


@pytest.fixture
def filled(pg: PostgresServer, tmp_path: Path) -> Filled:
    name = f"c_{uuid.uuid4().hex[:12]}"
    run(_execute(pg.get_uri(), f'CREATE DATABASE "{name}"'))
    return Filled(str(pg.get_uri(name)), tmp_path / "roster.json")


# ---------------------------------------------------------------------------------- verify


def test_verify_intact(filled: Filled) -> None:
    done = audit("verify", "--database-url", filled.url, "--roster", filled.roster)
    assert done.returncode == 0, done.stderr
    assert "intact: 12 entries" in done.stdout
    done = audit("verify", "--json", "--roster", filled.roster,
                 env={DATABASE_URL_ENV: filled.url})  # env resolution
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["entries"] == 12 and report["broken_seq"] is None
    assert report["known_signers"] == 3 and report["signers_checked"]


def test_verify_without_a_roster_is_not_a_pass(filled: Filled) -> None:
    """No signed roster: the chain recomputes, but the answer is 'signers not checked', exit 1."""
    done = audit("verify", "--database-url", filled.url)
    assert done.returncode == 1, done.stderr
    assert "NOT VERIFIED" in done.stdout and "signers not checked" in done.stdout
    report = json.loads(audit("verify", "--database-url", filled.url, "--json").stdout)
    assert not report["ok"] and report["chain_ok"] and not report["signers_checked"]


def test_verify_refuses_an_edited_roster(filled: Filled, tmp_path: Path) -> None:
    """A roster copy with a member added after signing is refused (exit 2, named)."""
    doc = json.loads(Path(filled.roster).read_text())
    doc["members"].append({"name": "mallory", "role": "hospital",
                           "peer_id": Identity.generate().peer_id})
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    done = audit("verify", "--database-url", filled.url, "--roster", str(edited))
    assert done.returncode == 2 and "member mallory (hospital) has not signed" in done.stderr


def test_verify_ignores_the_nodes_table(filled: Filled) -> None:
    """Emptying ``nodes`` changes nothing: signers come from the roster file."""
    run(_execute(filled.url, "DELETE FROM nodes"))
    done = audit("verify", "--database-url", filled.url, "--roster", filled.roster)
    assert done.returncode == 0 and "intact: 12 entries" in done.stdout


@pytest.mark.parametrize(
    ("statements", "seq", "problem"),
    [
        (["UPDATE audit_entries SET subject = 'x' WHERE seq = 5"], 5, "bad actor signature"),
        (
            [
                "UPDATE audit_entries SET body = '{\"i\": 99}'::jsonb,"
                " body_canonical = '{\"i\":99}' WHERE seq = 7"
            ],
            7,
            "bad actor signature",
        ),
        (["DELETE FROM audit_entries WHERE seq = 3"], 4, "removed row"),
        (
            [
                "UPDATE audit_entries SET seq = 1000 WHERE seq = 8",
                "UPDATE audit_entries SET seq = 8 WHERE seq = 9",
                "UPDATE audit_entries SET seq = 9 WHERE seq = 1000",
            ],
            8,
            "prev_hash does not match",
        ),
        (
            ["UPDATE audit_entries SET writer_signature = repeat('0', 128) WHERE seq = 11"],
            11,
            "bad writer signature",
        ),
    ],
    ids=["subject", "body", "removed", "reordered", "writer-signature"],
)
def test_verify_names_superuser_tampering(
    filled: Filled, statements: list[str], seq: int, problem: str
) -> None:
    run(
        _execute(
            filled.url,
            "ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_append_only",
            *statements,
            "ALTER TABLE audit_entries ENABLE TRIGGER audit_entries_append_only",
        )
    )
    done = audit("verify", "--database-url", filled.url, "--roster", filled.roster)
    assert done.returncode == 1, done.stderr
    assert f"BROKEN at seq {seq}" in done.stdout and problem in done.stdout
    done = audit("verify", "--database-url", filled.url, "--json", "--roster", filled.roster)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert not report["ok"] and report["broken_seq"] == seq and problem in report["problem"]


def test_embedded_data_dir_resolution(tmp_path: Path, pg: PostgresServer) -> None:
    missing = tmp_path / "nowhere"
    done = audit("verify", "--data-dir", str(missing))
    assert done.returncode == 2
    assert f"no audit database at {missing}; run medimesh demo first" in done.stderr
    assert not missing.exists()
    # An existing data directory: the embedded server is used (this one is already running,
    # and the child's handle does not stop it).
    done = audit("verify", "--json", env={DATA_DIR_ENV: str(pg.pgdata)})
    assert done.returncode == 1, done.stderr  # no roster given: not a pass
    report = json.loads(done.stdout)
    assert report["chain_ok"] and not report["signers_checked"]


# ------------------------------------------------------------------------------------ show


def test_show_table_and_json(filled: Filled) -> None:
    done = audit("show", "--database-url", filled.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["seq", "time", "(UTC)"]
    assert len(lines) == 1 + 12 + 1 and lines[-1] == "(12 entries)"
    assert "coordinator" in lines[1] and "round.opened" in lines[1]
    assert "st-marys" in lines[2] and '{"i":1}' in lines[2]

    done = audit("show", "--database-url", filled.url, "--json", "--limit", "3")
    rows = [json.loads(x) for x in done.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [10, 11, 12]
    assert rows[0]["actor_name"] == "st-marys" and rows[0]["body"] == {"i": 9}

    done = audit("show", "--database-url", filled.url, "--json", "--event", "round.opened",
                 "--limit", "0")
    assert [json.loads(x)["seq"] for x in done.stdout.splitlines()] == [1, 5, 9]
    done = audit("show", "--database-url", filled.url, "--json", "--round", "1")
    assert [json.loads(x)["seq"] for x in done.stdout.splitlines()] == [5, 6, 7, 8]


# ------------------------------------------------------------------------------ provenance


def test_provenance_lineage(filled: Filled) -> None:
    newest = filled.hashes[-1]
    done = audit("provenance", newest[:10], "--database-url", filled.url, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["model_hash"] == newest and doc["complete"]
    assert [m["model_hash"] for m in doc["lineage"]] == filled.hashes[::-1]
    assert [m["round"] for m in doc["lineage"]] == [2, 1, 0]
    assert doc["lineage"][0]["parent_hash"] == filled.hashes[1]
    assert doc["lineage"][0]["updates"] == ["20" * 32, "21" * 32]
    assert doc["lineage"][0]["verdicts"] == ["2f" * 32]
    assert doc["lineage"][-1]["parent_hash"] is None and doc["lineage"][-1]["updates"] == []

    done = audit("provenance", newest, "--database-url", filled.url)
    assert done.returncode == 0, done.stderr
    assert "(initial model)" in done.stdout
    assert "3 model(s) back to the initial model" in done.stdout
    assert "update  " + "20" * 32 in done.stdout


def test_provenance_unknown_hash_is_a_clear_error(filled: Filled) -> None:
    for wanted, message in [
        ("ab" * 32, "no model with hash"),
        ("abcd", "prefix of >= 8 hex characters"),
        ("not-hex!", "is not a hex model hash"),
    ]:
        done = audit("provenance", wanted, "--database-url", filled.url)
        assert done.returncode == 2, done.stdout
        assert message in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------- bench


def test_audit_bench_reports_rates() -> None:
    result = run_audit_bench(n_append=500, n_verify=1000, batch=100)
    json.dumps(result)  # JSON-able
    assert result["benchmark"] == "audit"
    assert set(result["append"]) >= {"entries", "batch", "seconds", "entries_per_s", "batch_ms"}
    assert result["append"]["entries"] == 500 and result["append"]["all_written"]
    assert set(result["verify"]) >= {"entries", "seconds", "entries_per_s", "ok"}
    assert result["verify"]["entries"] == 1000 and result["verify"]["ok"]
