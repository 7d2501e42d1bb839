"""Key files and the roster file: ``medimesh keys new|show`` and ``medimesh roster add|show``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medimesh.errors import ConfigError
from medimesh.identity import Identity, Member, Roster
from medimesh.keys import (
    ROSTER_FILE,
    add_member,
    consortium_roster,
    enrolled_identity,
    format_roster,
    load_key,
    load_roster,
    new_key,
    parse_peer_id,
    read_pub,
    save_roster,
    write_axl_pem,
)

NOT_A_POINT = "ab" * 32  # 64 hex, but no Ed25519 public key has an X25519 twin like this


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The installed entry point, so stdout is the command's own (not `-m`, which runs cli twice).
    code = "import sys; from medimesh.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


# ----------------------------------------------------------------------------------- key files


def test_new_key_writes_a_private_seed_and_a_public_peer_id(tmp_path: Path) -> None:
    """NAME.key is 0600 in a 0700 folder and loads to the peer id that NAME.pub holds."""
    made = new_key("cleveland", tmp_path / "keys")
    assert made.key_file.stat().st_mode & 0o777 == 0o600
    assert made.pub_file.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert load_key(made.key_file).peer_id == made.peer_id == read_pub(made.pub_file)
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
        "cleveland.key",
        "cleveland.pub",
    ]  # no temporary file left behind


def test_new_key_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    """A second `keys new` for the same name fails; --force replaces the identity."""
    first = new_key("va", tmp_path)
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        new_key("va", tmp_path)
    assert load_key(first.key_file).peer_id == first.peer_id
    second = new_key("va", tmp_path, force=True)
    assert second.peer_id != first.peer_id
    assert load_key(second.key_file).peer_id == second.peer_id == read_pub(second.pub_file)
    assert second.key_file.stat().st_mode & 0o777 == 0o600


def test_unusable_key_files_are_clear_errors(tmp_path: Path) -> None:
    """Missing, readable by others, garbage, or a directory: one ConfigError naming the path."""
    with pytest.raises(ConfigError, match="no key file"):
        load_key(tmp_path / "nope.key")
    made = new_key("h", tmp_path)
    made.key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_key(made.key_file)
    made.key_file.write_text("not hex\n")
    made.key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="64-hex seed"):
        load_key(made.key_file)
    with pytest.raises(ConfigError, match="is a directory"):
        load_key(tmp_path)
    with pytest.raises(ConfigError, match="invalid name"):
        new_key("../escape", tmp_path)


def test_peer_ids_are_normalised_and_checked() -> None:
    """Upper case is accepted; wrong length, non-hex and non-points are refused."""
    pid = Identity.generate().peer_id
    assert parse_peer_id(f"  {pid.upper()}\n") == pid
    for bad, why in ((pid[:-2], "64 hex"), ("g" * 64, "64 hex"), (NOT_A_POINT, "Ed25519")):
        with pytest.raises(ConfigError, match=why):
            parse_peer_id(bad)


def test_axl_pem_carries_the_same_identity(tmp_path: Path) -> None:
    """The exported PKCS#8 PEM (AXL's PrivateKeyPath) has the same public key as the peer id."""
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    made = new_key("node", tmp_path)
    pem = tmp_path / "private.pem"
    write_axl_pem(load_key(made.key_file), pem)
    assert pem.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw.hex() == made.peer_id
    with pytest.raises(ConfigError, match="already exists"):
        write_axl_pem(load_key(made.key_file), pem)


# -------------------------------------------------------------------------------------- roster


def test_roster_add_builds_the_json_the_runtime_hands_to_actors(tmp_path: Path) -> None:
    """Members added one by one read back through Roster.from_json with names and roles."""
    path = tmp_path / "conf" / "roster.json"
    ids = {n: Identity.generate() for n in ("router", "cleveland", "hungary")}
    add_member(path, "router", "router", ids["router"].peer_id)
    add_member(path, "cleveland", "hospital", ids["cleveland"].peer_id.upper())
    add_member(path, "hungary", "hospital", ids["hungary"].peer_id)
    roster = Roster.from_json(path.read_text())
    assert [(m.name, m.role) for m in roster] == [
        ("router", "router"),
        ("cleveland", "hospital"),
        ("hungary", "hospital"),
    ]
    assert roster.by_name("cleveland").peer_id == ids["cleveland"].peer_id
    assert json.loads(path.read_text())["version"] == 1
    table = format_roster(roster).splitlines()
    assert table[0].split() == ["NAME", "ROLE", "PEER", "ID"] and len(table) == 4
    assert table[2].split() == ["cleveland", "hospital", ids["cleveland"].peer_id]
    assert sorted(p.name for p in path.parent.iterdir()) == ["roster.json"]


def test_roster_refuses_duplicates_and_bad_members(tmp_path: Path) -> None:
    """Same name, same key, a second coordinator, a bad role or key: refused, file unchanged."""
    path = tmp_path / "roster.json"
    a, b = Identity.generate(), Identity.generate()
    add_member(path, "coord", "coordinator", a.peer_id)
    before = path.read_text()
    cases = [
        (("coord", "hospital", b.peer_id), "named 'coord' is already enrolled"),
        (("other", "hospital", a.peer_id), "already enrolled as 'coord'"),
        (("coord2", "coordinator", b.peer_id), "one coordinator"),
        (("x", "wizard", b.peer_id), "unknown role"),
        (("x", "hospital", NOT_A_POINT), "not a valid Ed25519"),
        (("bad name", "hospital", b.peer_id), "invalid name"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            add_member(path, *args)
    assert path.read_text() == before
    add_member(path, "h2", "hospital", b.peer_id)  # several hospitals are fine


def test_unreadable_rosters_are_clear_errors(tmp_path: Path) -> None:
    """Missing, not JSON, wrong shape, a bad member, a directory: one line naming the file."""
    with pytest.raises(ConfigError, match="no roster at"):
        load_roster(tmp_path / "missing.json")
    assert len(load_roster(tmp_path / "missing.json", missing_ok=True)) == 0
    bad = tmp_path / "bad.json"
    for text in ("{", '{"members": 3}', '{"members": [{"name": "a", "role": "x"}]}'):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=r"bad\.json"):
            load_roster(bad)
    bad.write_text(json.dumps({"members": [{"name": "a", "role": "hospital", "peer_id": "00"}]}))
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        load_roster(bad)
    with pytest.raises(ConfigError, match="cannot read roster"):
        load_roster(tmp_path)


def _consortium_dir(tmp_path: Path, sites: list[str]) -> Path:
    keys = tmp_path / "keys"
    roles = [("router", "router"), ("auditor", "auditor"), ("validator", "validator"),
             ("coordinator", "coordinator")] + [(s, "hospital") for s in sites]
    for name, role in roles:
        add_member(keys / ROSTER_FILE, name, role, new_key(name, keys).peer_id)
    return keys


def test_enrolled_identity_checks_the_key_against_the_roster(tmp_path: Path) -> None:
    """The runtime loads NAME.key only if the roster enrols that very key in that role."""
    keys = _consortium_dir(tmp_path, ["cleveland"])
    roster = load_roster(keys / ROSTER_FILE)
    ident = enrolled_identity(keys, roster, "cleveland", "hospital")
    assert ident.peer_id == roster.by_name("cleveland").peer_id
    with pytest.raises(ConfigError, match="as hospital, not validator"):
        enrolled_identity(keys, roster, "cleveland", "validator")
    new_key("cleveland", keys, force=True)  # a replaced key no longer matches the roster
    with pytest.raises(ConfigError, match="but the roster enrols 'cleveland'"):
        enrolled_identity(keys, roster, "cleveland", "hospital")
    new_key("stranger", keys)
    with pytest.raises(ConfigError, match="does not enrol 'stranger'"):
        enrolled_identity(keys, roster, "stranger", "hospital")
    with pytest.raises(ConfigError, match="hospital\\(s\\) cleveland"):
        consortium_roster(keys, ["hungary"])
    save_roster(Roster([Member("r", "router", ident.peer_id)]), keys / ROSTER_FILE)
    assert len(consortium_roster(keys, [])) == 1


@pytest.mark.ray
def test_consortium_runs_on_the_operators_key_files(tmp_path: Path, ray_session: None) -> None:
    """RunConfig.keys_dir: every actor signs with its file's key; a round still trains."""
    from medimesh.actors.runtime import Consortium, RunConfig

    keys = _consortium_dir(tmp_path, ["hospital-01", "hospital-02"])
    fed = Consortium(RunConfig(hospitals=2, rounds=1, keys_dir=str(keys), round_timeout_s=20))
    try:
        fed.start()
        history = fed.run()
        roster = load_roster(keys / ROSTER_FILE)
        assert {n: i.peer_id for n, i in fed.identities.items()} == {
            m.name: m.peer_id for m in roster
        }
        assert fed.roster.to_json() == roster.to_json()
        assert len(history) == 1 and history[0]["accepted"] == 2
        assert fed.verify_audit()["ok"]
    finally:
        fed.shutdown()


# ------------------------------------------------------------------------------------- the CLI


def test_cli_enrols_a_consortium_end_to_end(tmp_path: Path) -> None:
    """keys new prints only the peer id; roster add takes it; roster show --json reads back."""
    out = _cli("keys", "new", "cleveland", "--dir", "k", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    peer_id = out.stdout.strip()
    assert len(peer_id) == 64 and "k/cleveland.key" in out.stderr
    assert (tmp_path / "k" / "cleveland.key").stat().st_mode & 0o777 == 0o600
    shown = _cli("keys", "show", "k/cleveland.key", cwd=tmp_path)
    assert shown.stdout.strip() == peer_id
    added = _cli("roster", "add", "cleveland", "--role", "hospital", "--peer-id", peer_id,
                 "--roster", "r.json", "--json", cwd=tmp_path)
    assert json.loads(added.stdout) == {"name": "cleveland", "role": "hospital",
                                        "peer_id": peer_id}
    router = new_key("router", tmp_path / "k")
    assert _cli("roster", "add", "router", "--role", "router", "--pub", str(router.pub_file),
                "--roster", "r.json", cwd=tmp_path).returncode == 0
    listed = _cli("roster", "show", "--roster", "r.json", "--json", cwd=tmp_path)
    roster = Roster.from_json(listed.stdout)
    assert [(m.name, m.peer_id) for m in roster] == [("cleveland", peer_id),
                                                     ("router", router.peer_id)]
    table = _cli("roster", "show", "--roster", "r.json", cwd=tmp_path).stdout
    assert "cleveland" in table and router.peer_id in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "new", "cleveland", "--dir", "k"], "already exists; pass --force"),
        (["keys", "show", "k/none.key"], "no key file"),
        (["roster", "show", "--roster", "none.json"], "no roster at none.json"),
        (["roster", "add", "x", "--role", "hospital", "--peer-id", "00"], "64 hex"),
        (["roster", "add", "x", "--role", "hospital", "--pub", "k/none.pub"], "no public key"),
        (["roster", "add", "x", "--role", "wizard", "--peer-id", "00"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """Operator mistakes exit 2 with one line on stderr and nothing on stdout."""
    new_key("cleveland", tmp_path / "k")
    out = _cli(*args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
